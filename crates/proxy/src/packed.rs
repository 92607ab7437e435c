//! Texts kept as one deflate stream: the held set's resources (control.rs), whose JSON repeats
//! the same keys and shapes, so compressing them together gains ~17× (level 1) where compressing
//! each alone only halves them. Inflated only while every text is needed anyway (a parse, a
//! delta, a write of the state file, `/config`).

use std::fmt;

/// The deflate level: a delta inflates and deflates the whole set. For bench/memory.sh's
/// 3,000 resources level 1 packs 1.9 MB into 112 KB in 3.3 ms per update, next to a parse of
/// 8+ ms; level 3 saves 49 KB more for twice the time (docs/ARCHITECTURE.md).
const LEVEL: u8 = 1;

/// Texts in order, compressed together.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Packed {
    /// Each text's length in bytes.
    lens: Box<[u32]>,
    /// The texts concatenated, as raw deflate; empty when there are none.
    deflated: Box<[u8]>,
}

impl fmt::Debug for Packed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Packed({} texts, {} of {} bytes)",
            self.len(),
            self.deflated.len(),
            self.text_len()
        )
    }
}

impl Packed {
    /// Packs `texts`, in the order given.
    pub fn pack<'a>(texts: impl IntoIterator<Item = &'a str>) -> Packed {
        let mut lens = Vec::new();
        let mut all = String::new();
        for t in texts {
            // A text arrives in one gRPC message, far below 4 GiB.
            lens.push(u32::try_from(t.len()).expect("a text under 4 GiB"));
            all.push_str(t);
        }
        let deflated = if lens.is_empty() {
            Vec::new()
        } else {
            miniz_oxide::deflate::compress_to_vec(all.as_bytes(), LEVEL)
        };
        Packed {
            lens: lens.into(),
            deflated: deflated.into(),
        }
    }

    /// How many texts.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// The texts' total length, unpacked.
    pub fn text_len(&self) -> usize {
        self.lens.iter().map(|&l| l as usize).sum()
    }

    /// The compressed size: what is kept.
    pub fn packed_len(&self) -> usize {
        self.deflated.len() + self.lens.len() * size_of::<u32>()
    }

    /// The texts, inflated.
    pub fn unpack(&self) -> Unpacked {
        let total = self.text_len();
        let text = if self.deflated.is_empty() {
            String::new()
        } else {
            // Only `pack` makes the buffer: failing here is a bug, not bad input.
            let bytes = miniz_oxide::inflate::decompress_to_vec_with_limit(&self.deflated, total)
                .expect("packed texts inflate");
            String::from_utf8(bytes).expect("packed texts are UTF-8")
        };
        assert_eq!(text.len(), total, "packed texts have their lengths");
        let mut ends = Vec::with_capacity(self.lens.len());
        let mut end = 0;
        for &l in &*self.lens {
            end += l as usize;
            // Each text was a `str`: its boundaries are char boundaries.
            assert!(
                text.is_char_boundary(end),
                "packed texts split at char boundaries"
            );
            ends.push(end);
        }
        Unpacked { text, ends }
    }
}

/// Packed texts inflated: one buffer and where each text ends.
#[derive(Debug)]
pub struct Unpacked {
    text: String,
    ends: Vec<usize>,
}

impl Unpacked {
    /// The texts in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(s, e)| &self.text[s..e])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_come_back_as_packed() {
        let cases: &[&[&str]] = &[
            &[],
            &[""],
            &["", "", "a"],
            &["{\"a\":1}", "ümlaut ✓", "", "{\"a\":1}"],
        ];
        for texts in cases {
            let p = Packed::pack(texts.iter().copied());
            assert_eq!(p.len(), texts.len());
            assert_eq!(p.unpack().iter().collect::<Vec<_>>(), *texts, "{texts:?}");
        }
    }
}
