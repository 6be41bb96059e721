//! The input cursor's rows straight into the Arrow encoder.
//!
//! `SPI_cursor_fetch` copies every row it fetches into SPI's tuple table, and the encoder
//! then reads the copies. Here the portal runs with a DestReceiver of our own
//! (`PortalRunFetch`, what `SPI_cursor_fetch` calls inside): each row is deformed in its
//! slot and appended to the encoder as the executor produces it, with no copy. The
//! portal, its snapshot and its role are the ones `SPI_cursor_open` set up, unchanged.
//!
//! Once the batch being built holds `flush_bytes`, further rows of the fetch are copied
//! (as SPI would) and handed back, so that the caller can ship the batch before encoding
//! them: a batch never grows far past the limit, however large the values.

use pgrx::{pg_guard, pg_sys};

use crate::{convert::InputEncoder, error::CallError};

/// What one fetch produced.
pub struct Fetched {
    /// Rows the portal returned: encoded ones and `overflow`.
    pub rows: u64,
    /// Rows that came after the batch was full, copied in the fetch's memory context, to
    /// encode (in order, after the encoded ones) once the batch was sent.
    pub overflow: Vec<pg_sys::HeapTuple>,
}

/// The receiver the executor calls. `dest` must stay the first field: the executor only
/// knows the `DestReceiver` and the callbacks cast it back.
#[repr(C)]
struct Receiver {
    dest: pg_sys::DestReceiver,
    encoder: *mut InputEncoder,
    /// Where detoasted values and overflow copies are allocated.
    cx: pg_sys::MemoryContext,
    flush_bytes: usize,
    /// Rows before this fetch, to number rows in messages.
    first_row: u64,
    rows: u64,
    overflow: Vec<pg_sys::HeapTuple>,
    error: Option<CallError>,
}

/// Fetches up to `count` rows of `portal` into `encoder`.
///
/// # Safety
/// `portal` must be an open cursor of the current SPI connection whose tuple descriptor
/// `encoder` was planned from, and `cx` a memory context that the caller resets only
/// after it is done with the overflow tuples.
pub unsafe fn fetch(
    portal: pg_sys::Portal,
    encoder: &mut InputEncoder,
    count: i64,
    first_row: u64,
    flush_bytes: usize,
    cx: pg_sys::MemoryContext,
) -> Result<Fetched, CallError> {
    let mut receiver = Box::new(Receiver {
        dest: pg_sys::DestReceiver {
            receiveSlot: Some(receive_slot),
            rStartup: Some(startup),
            rShutdown: Some(shutdown),
            rDestroy: Some(shutdown),
            // Not DestSPI: nothing in the executor treats this receiver specially.
            mydest: pg_sys::CommandDest::DestNone,
        },
        encoder: encoder as *mut InputEncoder,
        cx,
        flush_bytes,
        first_row,
        rows: 0,
        overflow: Vec::new(),
        error: None,
    });
    // SAFETY: per the caller the portal is open and ready; the receiver outlives the
    // call (it is only used during it) and starts with its DestReceiver. PortalRunFetch
    // saves and restores the memory context and active portal itself, as it does for
    // SPI_cursor_fetch; an ERROR in the query unwinds through here and drops the box.
    let n = unsafe {
        pg_sys::PortalRunFetch(
            portal,
            pg_sys::FetchDirection::FETCH_FORWARD,
            count as std::ffi::c_long,
            &mut receiver.dest,
        )
    };
    if let Some(e) = receiver.error.take() {
        return Err(e);
    }
    Ok(Fetched {
        rows: n,
        overflow: std::mem::take(&mut receiver.overflow),
    })
}

#[pg_guard]
unsafe extern "C-unwind" fn receive_slot(
    slot: *mut pg_sys::TupleTableSlot,
    dest: *mut pg_sys::DestReceiver,
) -> bool {
    // SAFETY: `dest` is the first field of the Receiver that `fetch` passed to
    // PortalRunFetch, which is alive for the whole run; nothing else refers to it.
    let r = unsafe { &mut *(dest as *mut Receiver) };
    if r.error.is_some() {
        // Stop the run; fetch reports the error and the call ends with it.
        return false;
    }
    r.rows += 1;
    // SAFETY: the backend's one thread owns CurrentMemoryContext; r.cx is the caller's
    // live batch context, and the old one is put back below.
    let old = unsafe {
        let old = pg_sys::CurrentMemoryContext;
        pg_sys::CurrentMemoryContext = r.cx;
        old
    };
    // SAFETY: r.encoder is the caller's encoder, borrowed mutably for the whole fetch.
    let encoder = unsafe { &mut *r.encoder };
    if encoder.approx_bytes() >= r.flush_bytes {
        // SAFETY: slot holds the current row; the copy is palloc'd in r.cx.
        r.overflow
            .push(unsafe { pg_sys::ExecCopySlotHeapTuple(slot) });
    } else {
        // SAFETY: slot holds a row of the portal's descriptor; after slot_getallattrs
        // tts_values and tts_isnull hold natts valid entries until the next row.
        let appended = unsafe {
            pg_sys::slot_getallattrs(slot);
            let natts = (*(*slot).tts_tupleDescriptor).natts as usize;
            let values = std::slice::from_raw_parts((*slot).tts_values, natts);
            let nulls = std::slice::from_raw_parts((*slot).tts_isnull, natts);
            encoder.append_datums(values, nulls, r.first_row + r.rows)
        };
        if let Err(e) = appended {
            r.error = Some(e);
        }
    }
    // SAFETY: restores the context current on entry.
    unsafe { pg_sys::CurrentMemoryContext = old };
    r.error.is_none()
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(
    _dest: *mut pg_sys::DestReceiver,
    _operation: std::ffi::c_int,
    _typeinfo: pg_sys::TupleDesc,
) {
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown(_dest: *mut pg_sys::DestReceiver) {}
