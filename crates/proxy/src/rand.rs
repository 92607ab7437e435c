//! A small, fast per-thread random source for balancing and sampling decisions (not crypto).

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

thread_local! {
    static STATE: Cell<u64> = Cell::new({
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x9e37_79b9_7f4a_7c15);
        h.finish() | 1
    });
}

/// A uniformly distributed `u64` (wyrand).
pub fn u64() -> u64 {
    STATE.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    })
}

/// A uniformly distributed value in `0..n` (`n > 0`).
pub fn below(n: u64) -> u64 {
    ((u128::from(u64()) * u128::from(n)) >> 64) as u64
}

/// Stable 64-bit hash (FNV-1a, then a finalizer), for consistent hashing.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// SplitMix64 finalizer: spreads nearby inputs across the ring.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A fast, unkeyed hasher for maps whose keys an outsider cannot choose (names from the
/// config, verified identities) and whose size is bounded: SipHash, std's default, cost
/// ~0.8k instructions per request in the traffic report's lookup (bench/RESULTS.md). Eight
/// bytes per step, each folded in with a multiply (FxHash's round); `finish` mixes, so the
/// high bits the map's control bytes use depend on every input bit.
#[derive(Clone, Copy, Default)]
pub struct FastHasher(u64);

impl FastHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.add(u64::from_le_bytes(w.try_into().expect("eight bytes")));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            // The length keeps "a" and "a\0" apart.
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        mix(self.0)
    }
}

/// Builds [`FastHasher`]s: `HashMap<K, V, FastHash>`.
pub type FastHash = std::hash::BuildHasherDefault<FastHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn h<T: Hash>(t: T) -> u64 {
        FastHash::default().hash_one(t)
    }

    #[test]
    fn fast_hash_tells_apart_what_a_map_key_must() {
        // Pairs that differ only in length, order, position of a field boundary, or one bit.
        let pairs: &[(u64, u64, &str)] = &[
            (h("a"), h("a\0"), "trailing zero byte"),
            (h(("ab", "c")), h(("a", "bc")), "field boundary"),
            (h(("a", "b")), h(("b", "a")), "order"),
            (
                h("0123456789abcdef"),
                h("0123456789abcdeg"),
                "last byte of a full word",
            ),
            (h(Some("x")), h(None::<&str>), "Option"),
            (h(1u64), h(2u64), "one bit"),
            (h(""), h("\0"), "empty against one zero byte"),
        ];
        for (a, b, what) in pairs {
            assert_ne!(a, b, "{what}");
        }
        assert_eq!(h(("route", "backend")), h(("route", "backend")));
    }

    #[test]
    fn fast_hash_spreads_similar_keys_over_the_high_bits() {
        // The map picks groups by the low bits and tags entries by the top seven: keys that
        // differ by a digit (route names `svc1-r1`, `svc1-r2`, ...) must spread over both.
        let keys: Vec<u64> = (0..4096).map(|i| h(format!("ns0/svc{i}-r{i}/0"))).collect();
        let top: std::collections::HashSet<u64> = keys.iter().map(|k| k >> 57).collect();
        let low: std::collections::HashSet<u64> = keys.iter().map(|k| k & 0xfff).collect();
        assert_eq!(top.len(), 128, "every top-7-bit tag used");
        assert!(
            low.len() > 2500,
            "low 12 bits: {} distinct of 4096",
            low.len()
        );
    }
}
