//! The names of a retriever graph's inputs and outputs, as Optimum and
//! sentence-transformers exports use them. Writers ([`crate::emit`]) and
//! readers ([`crate::session`], [`crate::bench`], [`crate::graph_file`])
//! both take them from here.

pub const INPUT_IDS: &str = "input_ids";
pub const ATTENTION_MASK: &str = "attention_mask";
pub const TOKEN_TYPE_IDS: &str = "token_type_ids";
/// Every token input a graph may take.
pub const TOKEN_INPUTS: [&str; 3] = [INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS];
/// The backbone's output, `(batch, sequence, hidden)`.
pub const LAST_HIDDEN_STATE: &str = "last_hidden_state";
/// The pooled (and normalised) embedding, `(batch, dimension)`.
pub const SENTENCE_EMBEDDING: &str = "sentence_embedding";
