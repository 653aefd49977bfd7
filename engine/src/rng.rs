//! The run's random generators: independent ChaCha8 streams derived from the one seed, so that e.g.
//! changing the dropout rate does not change the LoRA init or the data order. A checkpoint records a
//! generator as (seed, stream, word position) and `checkpoint::RngState::restore` rebuilds it here.
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The generator of `stream` for the run seeded with `seed`.
pub fn rng_for(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Stream of the LoRA initialisation.
pub const INIT_STREAM: u64 = 1;
/// Stream of the LoRA dropout masks.
pub const DROPOUT_STREAM: u64 = 2;
