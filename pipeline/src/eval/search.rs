//! Exact top-k search by blocked matrix multiplication: memory stays bounded
//! by `query_block × doc_block` scores whatever the corpus size.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use ndarray::{s, Array2, ArrayView2, Axis};

use crate::error::{Error, Result};
use crate::model::sentence_transformers::Similarity;

/// Block sizes of the search.
#[derive(Debug, Clone, Copy)]
pub struct SearchOptions {
    pub k: usize,
    pub similarity: Similarity,
    pub query_block: usize,
    pub doc_block: usize,
    /// Never return a document whose id equals the query id (BEIR's
    /// `ignore_identical_ids`).
    pub ignore_identical_ids: bool,
}

impl SearchOptions {
    pub fn new(k: usize, similarity: Similarity) -> Self {
        Self {
            k,
            similarity,
            query_block: 256,
            doc_block: 8192,
            ignore_identical_ids: false,
        }
    }
}

/// One retrieved document: index into the corpus, and score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub doc: usize,
    pub score: f32,
}

/// A heap entry ordered so that the heap's top is the *worst* hit kept:
/// lower score, or equal score and smaller document id (trec_eval ranks
/// equal scores by descending id).
struct Worst<'a> {
    hit: Hit,
    id: &'a str,
}

impl Worst<'_> {
    fn better_than(&self, other: &Self) -> bool {
        match self.hit.score.partial_cmp(&other.hit.score) {
            Some(Ordering::Greater) => true,
            Some(Ordering::Less) => false,
            _ => self.id.as_bytes() > other.id.as_bytes(),
        }
    }
}

impl PartialEq for Worst<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Worst<'_> {}
impl PartialOrd for Worst<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Worst<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        if self.better_than(other) {
            Ordering::Less
        } else if other.better_than(self) {
            Ordering::Greater
        } else {
            Ordering::Equal
        }
    }
}

fn normalized(x: ArrayView2<f32>) -> Array2<f32> {
    let mut out = x.to_owned();
    for mut row in out.rows_mut() {
        let norm = row.dot(&row).sqrt().max(1e-12);
        row.mapv_inplace(|v| v / norm);
    }
    out
}

/// The top `options.k` documents of every query, best first (ties by
/// descending document id). `queries`: `(Q, D)`; `corpus`: `(N, D)`.
pub fn search(
    queries: ArrayView2<f32>,
    query_ids: &[String],
    corpus: ArrayView2<f32>,
    doc_ids: &[String],
    options: &SearchOptions,
) -> Result<Vec<Vec<Hit>>> {
    if options.k == 0 {
        return Err(Error::InvalidArgument("k must be at least 1".into()));
    }
    if queries.ncols() != corpus.ncols() {
        return Err(Error::InvalidArgument(format!(
            "query embeddings have {} dimensions, corpus embeddings {}",
            queries.ncols(),
            corpus.ncols()
        )));
    }
    if queries.nrows() != query_ids.len() || corpus.nrows() != doc_ids.len() {
        return Err(Error::InvalidArgument(
            "embedding rows do not match the ids".into(),
        ));
    }
    let (queries, corpus) = match options.similarity {
        Similarity::Cosine => (normalized(queries), normalized(corpus)),
        Similarity::Dot => (queries.to_owned(), corpus.to_owned()),
    };
    let mut results = Vec::with_capacity(queries.nrows());
    for (qb, query_block) in queries
        .axis_chunks_iter(Axis(0), options.query_block)
        .enumerate()
    {
        let first_query = qb * options.query_block;
        let mut heaps: Vec<BinaryHeap<Worst>> = (0..query_block.nrows())
            .map(|_| BinaryHeap::with_capacity(options.k + 1))
            .collect();
        for (db, doc_block) in corpus
            .axis_chunks_iter(Axis(0), options.doc_block)
            .enumerate()
        {
            let first_doc = db * options.doc_block;
            let scores = query_block.dot(&doc_block.t()); // (q, n)
            for (qi, heap) in heaps.iter_mut().enumerate() {
                let qid = &query_ids[first_query + qi];
                for (di, &score) in scores.slice(s![qi, ..]).iter().enumerate() {
                    let doc = first_doc + di;
                    let id = doc_ids[doc].as_str();
                    if options.ignore_identical_ids && id == qid {
                        continue;
                    }
                    let candidate = Worst {
                        hit: Hit { doc, score },
                        id,
                    };
                    if heap.len() < options.k {
                        heap.push(candidate);
                    } else if heap
                        .peek()
                        .is_some_and(|worst| candidate.better_than(worst))
                    {
                        heap.pop();
                        heap.push(candidate);
                    }
                }
            }
        }
        for heap in heaps {
            // `into_sorted_vec` is ascending by `Ord`, i.e. best first here.
            results.push(heap.into_sorted_vec().into_iter().map(|w| w.hit).collect());
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize, prefix: &str) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    /// Brute force over the full score matrix, sorted by trec_eval's order.
    fn brute_force(
        q: &Array2<f32>,
        c: &Array2<f32>,
        doc_ids: &[String],
        k: usize,
    ) -> Vec<Vec<usize>> {
        let scores = q.dot(&c.t());
        scores
            .rows()
            .into_iter()
            .map(|row| {
                let mut order: Vec<usize> = (0..c.nrows()).collect();
                order.sort_by(|&a, &b| {
                    row[b]
                        .partial_cmp(&row[a])
                        .unwrap()
                        .then_with(|| doc_ids[b].cmp(&doc_ids[a]))
                });
                order.truncate(k);
                order
            })
            .collect()
    }

    #[test]
    fn blocked_search_equals_brute_force_including_ties() {
        // Scores on a coarse grid so many ties occur.
        let q = Array2::from_shape_fn((37, 4), |(i, j)| ((i * 7 + j * 3) % 5) as f32);
        let c = Array2::from_shape_fn((101, 4), |(i, j)| ((i * 11 + j * 5) % 4) as f32);
        let (qids, dids) = (ids(37, "q"), ids(101, "d"));
        let mut options = SearchOptions::new(10, Similarity::Dot);
        options.query_block = 8;
        options.doc_block = 16;
        let got = search(q.view(), &qids, c.view(), &dids, &options).unwrap();
        let want = brute_force(&q, &c, &dids, 10);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.iter().map(|h| h.doc).collect::<Vec<_>>(), *w);
        }
    }

    #[test]
    fn identical_ids_can_be_excluded() {
        let q = Array2::from_shape_vec((1, 2), vec![1.0, 0.0]).unwrap();
        let c = Array2::from_shape_vec((2, 2), vec![1.0, 0.0, 0.5, 0.5]).unwrap();
        let (qids, dids) = (
            vec!["x".to_string()],
            vec!["x".to_string(), "y".to_string()],
        );
        let mut options = SearchOptions::new(5, Similarity::Cosine);
        assert_eq!(
            search(q.view(), &qids, c.view(), &dids, &options).unwrap()[0][0].doc,
            0
        );
        options.ignore_identical_ids = true;
        let hits = search(q.view(), &qids, c.view(), &dids, &options).unwrap();
        assert_eq!(hits[0].iter().map(|h| h.doc).collect::<Vec<_>>(), vec![1]);
    }
}
