//! Input generation: a splitmix64 generator, random buffers, mutation of hand-made seeds, and
//! the reader and writer of the byte format the targets decode through `arbitrary`.

use arbitrary::Unstructured;

/// splitmix64 (Steele, Lea, Flood 2014): small, fast, and every seed gives a good stream.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is irrelevant here.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Largest input a mutation may grow to.
pub const MAX_INPUT: usize = 4096;

const INTERESTING_8: [u8; 10] = [0, 1, 2, 0x7f, 0x80, 0xff, 0x10, 0x20, 0x40, 0xfe];
const INTERESTING_32: [u32; 12] =
    [0, 1, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff];

/// The input of one execution: random bytes, or a seed with a few mutations.
pub fn generate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if seeds.is_empty() || rng.below(4) == 0 {
        let len = match rng.below(10) {
            0..=4 => rng.below(64),
            5..=7 => 64 + rng.below(448),
            _ => 512 + rng.below(MAX_INPUT - 512),
        };
        let mut v = vec![0u8; len];
        rng.fill(&mut v);
        return v;
    }
    let mut v = seeds[rng.below(seeds.len())].clone();
    // Mostly few mutations, so that the seed's structure survives.
    let most = 1 + rng.below(8);
    let rounds = 1 + rng.below(most);
    for _ in 0..rounds {
        mutate(rng, &mut v);
    }
    v.truncate(MAX_INPUT);
    v
}

fn mutate(rng: &mut Rng, v: &mut Vec<u8>) {
    if v.is_empty() {
        v.push(rng.byte());
        return;
    }
    let len = v.len();
    let at = rng.below(len);
    match rng.below(12) {
        0 => v[at] ^= 1 << rng.below(8),
        1 => v[at] = rng.byte(),
        2 => v[at] = INTERESTING_8[rng.below(INTERESTING_8.len())],
        3 => v[at] = v[at].wrapping_add(1 + rng.below(8) as u8),
        4 => v[at] = v[at].wrapping_sub(1 + rng.below(8) as u8),
        5 => {
            // A little-endian word set to an edge value.
            let w = INTERESTING_32[rng.below(INTERESTING_32.len())].to_le_bytes();
            let n = [1, 2, 4][rng.below(3)].min(len - at);
            v[at..at + n].copy_from_slice(&w[..n]);
        }
        6 => {
            let n = 1 + rng.below(8);
            let mut ins = vec![0u8; n];
            rng.fill(&mut ins);
            v.splice(at..at, ins);
        }
        7 => {
            let n = (1 + rng.below(8)).min(len - at);
            v.drain(at..at + n);
        }
        8 => {
            // Copy a range over another place.
            let n = (1 + rng.below(16)).min(len - at);
            let to = rng.below(len);
            let piece: Vec<u8> = v[at..at + n].to_vec();
            for (i, b) in piece.into_iter().enumerate() {
                if to + i < len {
                    v[to + i] = b;
                }
            }
        }
        9 => v.truncate(at),
        10 => {
            let n = 1 + rng.below(64);
            let start = v.len();
            v.resize(start + n, 0);
            rng.fill(&mut v[start..]);
        }
        _ => {
            let n = (1 + rng.below(4)).min(len - at);
            rng.fill(&mut v[at..at + n]);
        }
    }
}

/// Reads an input the way the targets do: through `arbitrary::Unstructured`, with integers
/// taken little-endian and zeros once the data runs out, so seeds can be written by hand with
/// [`Seed`].
pub struct Input<'a> {
    u: Unstructured<'a>,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { u: Unstructured::new(data) }
    }

    pub fn is_empty(&self) -> bool {
        self.u.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        self.u.arbitrary().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        self.u.arbitrary().unwrap_or(0)
    }

    pub fn u32(&mut self) -> u32 {
        self.u.arbitrary().unwrap_or(0)
    }

    pub fn u64(&mut self) -> u64 {
        self.u.arbitrary().unwrap_or(0)
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// `0..n` from one byte (n <= 256) or two.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0);
        if n <= 256 {
            usize::from(self.u8()) % n
        } else {
            usize::from(self.u16()) % n
        }
    }

    /// `n` bytes, zero-padded past the end of the data.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        let _ = self.u.fill_buffer(&mut v);
        v
    }
}

/// Writes a seed in the format [`Input`] reads.
#[derive(Default)]
pub struct Seed(Vec<u8>);

impl Seed {
    pub fn new() -> Self {
        Seed(Vec::new())
    }

    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }

    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }

    pub fn build(self) -> Vec<u8> {
        self.0
    }
}

pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_read_back_as_written() {
        let s = Seed::new().u8(7).u16(0x1234).u32(0xdead_beef).u64(9).bytes(&[1, 2]).build();
        let mut i = Input::new(&s);
        assert_eq!((i.u8(), i.u16(), i.u32(), i.u64()), (7, 0x1234, 0xdead_beef, 9));
        assert_eq!(i.bytes(3), vec![1, 2, 0]);
        assert!(i.is_empty());
        assert_eq!(i.u32(), 0, "zeros past the end");
    }

    #[test]
    fn generation_is_deterministic_and_bounded() {
        let seeds = vec![vec![1u8; 100], vec![]];
        let a: Vec<_> = (0..200).map(|i| generate(&mut Rng::new(i), &seeds)).collect();
        let b: Vec<_> = (0..200).map(|i| generate(&mut Rng::new(i), &seeds)).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|v| v.len() <= MAX_INPUT));
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(unhex(&hex(&[0, 0xab, 0xff])), Some(vec![0, 0xab, 0xff]));
        assert_eq!(unhex("abc"), None);
    }
}
