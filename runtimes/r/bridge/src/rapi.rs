//! The few R C-API operations the conversions need, each wrapped once with its safety
//! argument. Every function here runs on R's main thread (the only thread that calls
//! into this library through `.Call`); the print thread never comes here.
//!
//! Ownership: vectors are created through [`alloc`], which wraps them in an extendr
//! [`Robj`] (protected from R's garbage collector until dropped). Elements (CHARSXPs,
//! list members) are stored into such a protected vector right after they are made,
//! with no allocation in between, so they never need protection of their own.

use std::borrow::Cow;

use extendr_api::prelude::*;
use extendr_api::SEXP;
use extendr_ffi as ffi;

use crate::error::BridgeError;

pub use ffi::SEXPTYPE;

extern "C" {
    // In R's API (Rinternals.h) but not bound by extendr-ffi. Declared with an opaque
    // pointer: a SEXP is a pointer to R's private struct.
    fn Rf_getCharCE(x: *mut std::ffi::c_void) -> ffi::cetype_t;
}

/// R's NA for integers and logicals.
pub const NA_INTEGER: i32 = i32::MIN;
/// bit64's NA for integer64.
pub const NA_INTEGER64: i64 = i64::MIN;

/// A fresh vector of `n` elements of type `t`, protected while the `Robj` lives.
/// Numeric and raw vectors are uninitialised: the caller fills every element.
/// Lists and character vectors start as NULLs and empty strings.
pub fn alloc(t: SEXPTYPE, n: usize) -> Result<Robj, BridgeError> {
    let len = ffi::R_xlen_t::try_from(n).map_err(|_| BridgeError::TooLong(n))?;
    // SAFETY: allocVector is called on R's main thread with a valid type and length; it
    // returns a valid SEXP (or longjmps on memory exhaustion, which ends the process's
    // useful life anyway). from_sexp protects it at once.
    Ok(unsafe { Robj::from_sexp(ffi::Rf_allocVector(t, len)) })
}

/// The elements of a logical vector as R stores them: 0, 1, or NA_INTEGER.
pub fn logical_slice(x: &Robj) -> Option<&[i32]> {
    if x.sexptype() != SEXPTYPE::LGLSXP {
        return None;
    }
    // SAFETY: x is a LGLSXP, whose data is XLENGTH ints, alive while x is.
    Some(unsafe { std::slice::from_raw_parts(ffi::LOGICAL(x.get()), x.len()) })
}

/// The elements of a logical vector, writable.
pub fn logical_slice_mut(x: &mut Robj) -> Option<&mut [i32]> {
    if x.sexptype() != SEXPTYPE::LGLSXP {
        return None;
    }
    let n = x.len();
    // SAFETY: x is a LGLSXP, whose data is XLENGTH ints, alive and borrowed mutably.
    Some(unsafe { std::slice::from_raw_parts_mut(ffi::LOGICAL(x.get_mut()), n) })
}

/// `NULL`.
pub fn null() -> Robj {
    Robj::from(())
}

/// Sets `x[i] <- value` for a list.
pub fn set_list_elt(list: &mut Robj, i: usize, value: SEXP) {
    debug_assert!(list.sexptype() == SEXPTYPE::VECSXP && i < list.len());
    // SAFETY: `list` is a protected VECSXP and i is in bounds (callers iterate below its
    // length); value is a valid SEXP that the list now references.
    unsafe {
        ffi::SET_VECTOR_ELT(list.get_mut(), i as ffi::R_xlen_t, value);
    }
}

/// `x[[i]]` of a list, unprotected: valid while the list lives and is not modified.
pub fn list_elt(list: &Robj, i: usize) -> SEXP {
    debug_assert!(list.sexptype() == SEXPTYPE::VECSXP && i < list.len());
    // SAFETY: `list` is a VECSXP and i is in bounds.
    unsafe { ffi::VECTOR_ELT(list.get(), i as ffi::R_xlen_t) }
}

/// Wraps an element taken from a protected container as an `Robj` (protecting it again,
/// so it may outlive the borrow).
pub fn robj(x: SEXP) -> Robj {
    // SAFETY: x comes from a live protected container, so it is a valid SEXP.
    unsafe { Robj::from_sexp(x) }
}

/// A character vector from optional UTF-8 strings (`None` is `NA`).
pub fn strings<'a, I>(n: usize, values: I) -> Result<Robj, BridgeError>
where
    I: IntoIterator<Item = Option<Cow<'a, str>>>,
{
    let mut out = alloc(SEXPTYPE::STRSXP, n)?;
    for (i, v) in values.into_iter().enumerate().take(n) {
        let ch = match v {
            Some(s) => mk_char(&s)?,
            // SAFETY: R_NaString is R's global NA string, always valid.
            None => unsafe { ffi::R_NaString },
        };
        // SAFETY: out is a protected STRSXP of length n and i < n; ch is a CHARSXP made
        // just now (no allocation since) or the global NA.
        unsafe { ffi::SET_STRING_ELT(out.get_mut(), i as ffi::R_xlen_t, ch) };
    }
    Ok(out)
}

/// A CHARSXP holding `s`, marked UTF-8. R strings cannot hold NUL bytes or more than
/// 2^31 - 1 bytes; both are refused here rather than by R (whose error would longjmp).
fn mk_char(s: &str) -> Result<SEXP, BridgeError> {
    if s.as_bytes().contains(&0) {
        return Err(BridgeError::NulInString);
    }
    let len = i32::try_from(s.len()).map_err(|_| BridgeError::TooLong(s.len()))?;
    // SAFETY: the pointer and length describe valid UTF-8 without NUL bytes, within R's
    // length limit, so mkCharLenCE cannot fail for them.
    Ok(unsafe { ffi::Rf_mkCharLenCE(s.as_ptr().cast(), len, ffi::cetype_t::CE_UTF8) })
}

/// A scalar character vector.
pub fn string(s: &str) -> Result<Robj, BridgeError> {
    strings(1, [Some(Cow::Borrowed(s))])
}

/// Element `i` of a character vector as UTF-8, `None` for `NA`. Native strings are UTF-8
/// in the sandbox's locale (C.UTF-8) and are checked; latin1-marked strings are
/// converted; "bytes"-marked strings and invalid UTF-8 are an error.
pub fn string_elt(x: &Robj, i: usize) -> Result<Option<Cow<'_, str>>, String> {
    debug_assert!(x.sexptype() == SEXPTYPE::STRSXP && i < x.len());
    // SAFETY: x is a STRSXP and i is in bounds; the CHARSXP is referenced by x, so its
    // bytes stay valid (R strings are immutable) for as long as the borrow of x.
    unsafe {
        let ch = ffi::STRING_ELT(x.get(), i as ffi::R_xlen_t);
        if ch == ffi::R_NaString {
            return Ok(None);
        }
        let len = ffi::Rf_xlength(ch) as usize;
        let bytes = std::slice::from_raw_parts(ffi::R_CHAR(ch).cast::<u8>(), len);
        match Rf_getCharCE(ch.cast()) {
            ffi::cetype_t::CE_LATIN1 => Ok(Some(Cow::Owned(
                bytes.iter().map(|&b| char::from(b)).collect(),
            ))),
            ffi::cetype_t::CE_BYTES => Err("holds a string marked as bytes".into()),
            _ => match std::str::from_utf8(bytes) {
                Ok(s) => Ok(Some(Cow::Borrowed(s))),
                Err(_) => Err("holds a string that is not valid UTF-8".into()),
            },
        }
    }
}

/// The classes of `x` (the `class` attribute), empty for none.
pub fn classes(x: &Robj) -> Vec<String> {
    x.class()
        .map(|c| c.map(|s| s.to_string()).collect())
        .unwrap_or_default()
}

/// `attr(x, name)` as a string, if it is a non-NA character value.
pub fn string_attr(x: &Robj, name: &str) -> Option<String> {
    let a = x.get_attrib(name)?;
    if a.sexptype() != SEXPTYPE::STRSXP || a.is_empty() {
        return None;
    }
    string_elt(&a, 0).ok().flatten().map(|s| s.into_owned())
}

/// Sets the class attribute.
pub fn set_class(x: &mut Robj, class: &[&str]) -> Result<(), BridgeError> {
    x.set_class(class)
        .map(|_| ())
        .map_err(|e| BridgeError::R(e.to_string()))
}

/// Sets an attribute.
pub fn set_attr(x: &mut Robj, name: &str, value: Robj) -> Result<(), BridgeError> {
    x.set_attrib(name, value)
        .map(|_| ())
        .map_err(|e| BridgeError::R(e.to_string()))
}

/// R's `is.na` for doubles: NA is a NaN whose low word is 1954 (R_IsNA). Other NaNs are
/// values.
pub fn is_na_real(x: f64) -> bool {
    x.is_nan() && (x.to_bits() & 0xFFFF_FFFF) == 1954
}

/// R's NA_real_.
pub fn na_real() -> f64 {
    f64::from_bits(0x7FF0_0000_0000_07A2)
}

/// A data.frame from named columns of equal length `rows`.
pub fn data_frame(names: &[&str], columns: Vec<Robj>, rows: usize) -> Result<Robj, BridgeError> {
    let mut df = alloc(SEXPTYPE::VECSXP, columns.len())?;
    for (i, c) in columns.iter().enumerate() {
        // SAFETY: c is a live protected Robj.
        set_list_elt(&mut df, i, unsafe { c.get() });
    }
    let names = strings(names.len(), names.iter().map(|n| Some(Cow::Borrowed(*n))))?;
    set_attr(&mut df, "names", names)?;
    // Compact row names: c(NA_integer_, -rows).
    let rows = i32::try_from(rows).map_err(|_| BridgeError::TooLong(rows))?;
    let mut rn = alloc(SEXPTYPE::INTSXP, if rows == 0 { 0 } else { 2 })?;
    if let Some([first, second]) = rn.as_integer_slice_mut() {
        *first = NA_INTEGER;
        *second = -rows;
    }
    set_attr(&mut df, "row.names", rn)?;
    set_class(&mut df, &["data.frame"])?;
    Ok(df)
}
