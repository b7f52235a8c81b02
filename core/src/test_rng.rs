//! A deterministic xorshift64 generator for the parsers' fuzz tests: the same
//! sequence on every run, so a failure reproduces.

/// Marsaglia's xorshift64 (13, 7, 17).
pub struct XorShift(u64);

impl XorShift {
    /// A generator starting from `seed` (nonzero).
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next value of the sequence.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
