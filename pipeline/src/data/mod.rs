//! Data the stages read: BEIR datasets, seeded document samples,
//! calibration text, and how queries and documents are written out for a
//! model ([`text_format`]).

pub mod beir;
pub mod calibration;
pub mod sampling;
pub mod text_format;
