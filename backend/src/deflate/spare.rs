//! zlib states given back between messages, for the next message on the
//! same thread to take.
//!
//! A socket with `no_context_takeover` drops its state after every message,
//! and an idle one lets its compressor go ([`super::codec::Deflater::release`]).
//! Freed, a compressor's 380 KiB (or an inflater's 47 KiB) goes back to the
//! allocator, which keeps most of it in the process's RSS, and the next
//! message allocates and zeroes a new one: 5,000 no-takeover sessions held
//! 40 to 92 KB of RSS each (BENCHMARKS.md, *Memory per idle session*) while
//! holding no state at all. Here a state given back is reset and kept, a
//! few per thread, and the next message of any socket on that thread
//! takes it, so what such sessions cost is a few states per thread
//! whatever their number.
//!
//! Per thread, not shared: a state is in use only while one message is
//! compressed or inflated, which happens inside one poll of one socket, so
//! a thread rarely needs more than one of each kind at once, and no lock is
//! taken on the way. A state taken on one thread may be given back on
//! another (a task that moved); it is then that thread's.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress};

/// Spare states kept per thread, of each kind; more given back are freed.
const SPARES_PER_THREAD: usize = 4;

/// A spare compressor: the level and window bits it was made with, which
/// a reset keeps.
struct SpareCompressor {
    level: u32,
    window_bits: u8,
    state: Compress,
}

thread_local! {
    static COMPRESSORS: RefCell<Vec<SpareCompressor>> = const { RefCell::new(Vec::new()) };
    static DECOMPRESSORS: RefCell<Vec<Decompress>> = const { RefCell::new(Vec::new()) };
}

/// A raw-deflate compressor at `level` with `window_bits`: a spare one of
/// this thread's if it has one made so, else a new one.
pub(crate) fn compressor(level: Compression, window_bits: u8) -> Compress {
    let spare = COMPRESSORS.with_borrow_mut(|spares| {
        let at = spares
            .iter()
            .position(|s| s.level == level.level() && s.window_bits == window_bits)?;
        Some(spares.swap_remove(at).state)
    });
    spare.unwrap_or_else(|| Compress::new_with_window_bits(level, false, window_bits))
}

/// Gives back a compressor made by [`compressor`] with `level` and
/// `window_bits`, between messages; it is reset to an empty window.
pub(crate) fn give_compressor(mut state: Compress, level: Compression, window_bits: u8) {
    state.reset();
    COMPRESSORS.with_borrow_mut(|spares| {
        if spares.len() < SPARES_PER_THREAD {
            spares.push(SpareCompressor {
                level: level.level(),
                window_bits,
                state,
            });
        }
    });
}

/// A raw-inflate decompressor with `window_bits` (the inflater always
/// uses the same): a spare one of this thread's if it has one, else new.
pub(crate) fn decompressor(window_bits: u8) -> Decompress {
    DECOMPRESSORS
        .with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| Decompress::new_with_window_bits(false, window_bits))
}

/// Gives back a decompressor made by [`decompressor`], between messages; it
/// is reset to an empty window.
pub(crate) fn give_decompressor(mut state: Decompress) {
    state.reset(false);
    DECOMPRESSORS.with_borrow_mut(|spares| {
        if spares.len() < SPARES_PER_THREAD {
            spares.push(state);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{FlushCompress, FlushDecompress};

    /// Compresses `input` with a sync flush.
    fn deflate(state: &mut Compress, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len() + 64);
        state
            .compress_vec(input, &mut out, FlushCompress::Sync)
            .unwrap();
        out
    }

    #[test]
    fn a_spare_compressor_starts_from_an_empty_window() {
        let level = Compression::new(1);
        let message = b"the same chat line, the same chat line, the same chat line";
        let mut fresh = compressor(level, 15);
        let first = deflate(&mut fresh, message);
        // With its window, the same message again is a back-reference.
        let again = deflate(&mut fresh, message);
        assert!(again.len() < first.len());
        give_compressor(fresh, level, 15);
        let mut spare = compressor(level, 15);
        assert_eq!(deflate(&mut spare, message), first, "the window is gone");
    }

    #[test]
    fn spares_are_kept_by_level_and_window_bits() {
        let (one, nine) = (Compression::new(1), Compression::new(9));
        give_compressor(compressor(one, 12), one, 12);
        let kept = COMPRESSORS.with_borrow(|s| s.len());
        // Another level or window takes none of them.
        drop(compressor(nine, 12));
        drop(compressor(one, 15));
        assert_eq!(COMPRESSORS.with_borrow(|s| s.len()), kept);
        drop(compressor(one, 12));
        assert_eq!(COMPRESSORS.with_borrow(|s| s.len()), kept - 1);
    }

    #[test]
    fn a_thread_keeps_a_few_spares_and_frees_the_rest() {
        let level = Compression::new(1);
        let made: Vec<Compress> = (0..SPARES_PER_THREAD + 3)
            .map(|_| compressor(level, 9))
            .collect();
        for state in made {
            give_compressor(state, level, 9);
        }
        assert_eq!(COMPRESSORS.with_borrow(|s| s.len()), SPARES_PER_THREAD);
        for _ in 0..SPARES_PER_THREAD + 3 {
            give_decompressor(decompressor(15));
        }
        assert!(DECOMPRESSORS.with_borrow(|s| s.len()) <= SPARES_PER_THREAD);
    }

    #[test]
    fn a_spare_decompressor_inflates_a_new_stream() {
        let mut c = Compress::new_with_window_bits(Compression::new(1), false, 15);
        let data = deflate(&mut c, b"hello hello hello");
        let mut d = decompressor(15);
        let mut out = Vec::with_capacity(64);
        d.decompress_vec(&data, &mut out, FlushDecompress::Sync)
            .unwrap();
        give_decompressor(d);
        // A new stream, from a new compressor, inflates from the start.
        let mut c = Compress::new_with_window_bits(Compression::new(1), false, 15);
        let data = deflate(&mut c, b"other words entirely");
        let mut d = decompressor(15);
        let mut again = Vec::with_capacity(64);
        d.decompress_vec(&data, &mut again, FlushDecompress::Sync)
            .unwrap();
        assert_eq!(again, b"other words entirely");
    }
}
