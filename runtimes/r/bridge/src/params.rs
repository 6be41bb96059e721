//! `params` (a JSON object) → R values, per docs/TYPES.md "Parameters": whole numbers
//! that fit int32 → integer, other numbers → double, strings → character, booleans →
//! logical, null → NULL, arrays of one scalar kind (nulls allowed, as NA) → vectors,
//! other arrays → lists, objects → named lists.

use std::borrow::Cow;

use extendr_api::prelude::*;
use serde_json::Value;

use crate::error::BridgeError;
use crate::rapi::{self, SEXPTYPE};

/// A JSON integer R can hold as an integer (its NA, i32::MIN, cannot be a value).
fn as_r_int(v: &Value) -> Option<i32> {
    let n = v.as_number()?;
    if !(n.is_i64() || n.is_u64()) {
        return None;
    }
    n.as_i64()
        .and_then(|i| i32::try_from(i).ok())
        .filter(|&i| i != rapi::NA_INTEGER)
}

pub fn to_r(v: &Value) -> Result<Robj, BridgeError> {
    match v {
        Value::Null => Ok(rapi::null()),
        Value::Bool(_) | Value::Number(_) | Value::String(_) => vector(std::slice::from_ref(v)),
        Value::Array(items) => {
            let scalars = items.iter().filter(|i| !i.is_null()).collect::<Vec<_>>();
            let one_kind = !scalars.is_empty()
                && (scalars.iter().all(|i| i.is_boolean())
                    || scalars.iter().all(|i| i.is_number())
                    || scalars.iter().all(|i| i.is_string()));
            if one_kind {
                vector(items)
            } else {
                let mut out = rapi::alloc(SEXPTYPE::VECSXP, items.len())?;
                for (i, item) in items.iter().enumerate() {
                    let r = to_r(item)?;
                    // SAFETY: r is a live protected Robj; the list references it now.
                    rapi::set_list_elt(&mut out, i, unsafe { r.get() });
                }
                Ok(out)
            }
        }
        Value::Object(map) => {
            let mut out = rapi::alloc(SEXPTYPE::VECSXP, map.len())?;
            for (i, item) in map.values().enumerate() {
                let r = to_r(item)?;
                // SAFETY: as above.
                rapi::set_list_elt(&mut out, i, unsafe { r.get() });
            }
            let names = rapi::strings(
                map.len(),
                map.keys().map(|k| Some(Cow::Borrowed(k.as_str()))),
            )?;
            rapi::set_attr(&mut out, "names", names)?;
            Ok(out)
        }
    }
}

/// A vector from scalars of one kind (and nulls, which become NA).
fn vector(items: &[Value]) -> Result<Robj, BridgeError> {
    let n = items.len();
    let first = items.iter().find(|i| !i.is_null());
    match first {
        Some(Value::Bool(_)) => {
            let mut out = rapi::alloc(SEXPTYPE::LGLSXP, n)?;
            let dst = rapi::logical_slice_mut(&mut out).ok_or(BridgeError::State("logical"))?;
            for (d, v) in dst.iter_mut().zip(items) {
                *d = v.as_bool().map_or(rapi::NA_INTEGER, i32::from);
            }
            Ok(out)
        }
        Some(Value::Number(_)) => {
            if items.iter().all(|v| v.is_null() || as_r_int(v).is_some()) {
                let mut out = rapi::alloc(SEXPTYPE::INTSXP, n)?;
                let dst = out
                    .as_integer_slice_mut()
                    .ok_or(BridgeError::State("integer"))?;
                for (d, v) in dst.iter_mut().zip(items) {
                    *d = as_r_int(v).unwrap_or(rapi::NA_INTEGER);
                }
                Ok(out)
            } else {
                let mut out = rapi::alloc(SEXPTYPE::REALSXP, n)?;
                let dst = out
                    .as_real_slice_mut()
                    .ok_or(BridgeError::State("double"))?;
                for (d, v) in dst.iter_mut().zip(items) {
                    *d = v.as_f64().unwrap_or_else(rapi::na_real);
                }
                Ok(out)
            }
        }
        Some(Value::String(_)) => {
            rapi::strings(n, items.iter().map(|v| v.as_str().map(Cow::Borrowed)))
        }
        _ => Err(BridgeError::State("vector() of non-scalars")),
    }
}
