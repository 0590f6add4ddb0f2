//! Retrieval evaluation: embedding a corpus through any [`text_embedder`],
//! exact search, trec_eval-identical metrics and the embedding cache.

pub mod corpus_shards;
pub mod embedding_cache;
pub mod evaluation;
pub mod metrics;
pub mod search;
pub mod text_embedder;
