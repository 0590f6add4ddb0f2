//! EffiR compression: sub-layer importance ([`analysis`]), zero-shot drop
//! studies, coarse-to-fine MLP pruning and the least-squares reconstruction
//! of narrowed MLPs ([`reconstruct`]), the DeciLM translation of a pruned
//! decoder, and the charts of the reports.

pub mod analysis;
pub mod chart;
pub mod decilm;
pub mod drop_study;
pub mod least_squares;
pub mod prune;
pub mod pruned_weights;
pub mod reconstruct;
pub mod streamed_prune;
