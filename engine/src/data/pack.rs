//! Packing: several examples per max_seq_len sequence, so short examples do not pay for padding.
//!
//! Examples are packed whole, in file order, greedily: an example goes into the current sequence if it
//! fits, else it starts the next one (so no example is split across sequences, and an example never
//! learns from a cut-off half of another). The epoch shuffle then permutes the packed sequences, like
//! TRL's packed datasets. Each example keeps its own mask: its first token is not a target, so nothing
//! is learned across a boundary.
//!
//! First version: attention is not blocked at example boundaries and position ids run on through the
//! sequence, so an example attends to the ones packed before it (as in TRL's packing without
//! `padding_free`). Blocking it needs the model to take per-row segment ids (a block-diagonal causal
//! mask and positions restarting at each example).
use super::encode::Tokenized;

/// Packs `examples` into sequences of at most `max_len` tokens; examples with no target are dropped
/// (they would only take space).
pub fn pack(examples: Vec<Tokenized>, max_len: usize) -> Vec<Tokenized> {
    let mut out = Vec::new();
    let mut current = Tokenized {
        ids: Vec::new(),
        trained: Vec::new(),
    };
    for mut ex in examples {
        if ex.targets() == 0 {
            continue;
        }
        ex.ids.truncate(max_len);
        ex.trained.truncate(max_len);
        if !current.ids.is_empty() && current.ids.len() + ex.ids.len() > max_len {
            out.push(std::mem::replace(
                &mut current,
                Tokenized {
                    ids: Vec::with_capacity(max_len),
                    trained: Vec::with_capacity(max_len),
                },
            ));
        }
        if let Some(first) = ex.trained.first_mut() {
            *first = false;
        }
        current.ids.extend_from_slice(&ex.ids);
        current.trained.extend_from_slice(&ex.trained);
    }
    if !current.ids.is_empty() {
        out.push(current);
    }
    out
}
