//! How a model's queries and documents are written out for encoding: the
//! document template, the model's prompts and the query prefix. Evaluation,
//! calibration and training all format text through it.

use serde::Serialize;

use crate::data::beir::Document;
use crate::error::Result;
use crate::model::encoder_setup::{EncoderSetup, Prompt};

/// How a corpus document becomes the text the model encodes. Placeholders:
/// `{title}`, `{text}`, `{title_or_none}` (`none` for an empty title, as
/// EmbeddingGemma's prompt expects) and `{prompt}` (the model's `document`
/// prompt).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DocumentTemplate(pub String);

impl DocumentTemplate {
    /// BEIR / sentence-transformers: `title + " " + text`.
    pub const TITLE_TEXT: &'static str = "{title} {text}";
    /// EmbeddingGemma's document prompt with the real title.
    pub const EMBEDDINGGEMMA: &'static str = "title: {title_or_none} | text: {text}";

    /// The template a model's prompts call for.
    pub fn for_model(setup: &EncoderSetup) -> Self {
        match setup.sentence.prompts.get("document") {
            Some(p) if p.starts_with("title: none | text:") => Self(Self::EMBEDDINGGEMMA.into()),
            Some(_) => Self("{prompt}{title} {text}".into()),
            None => Self(Self::TITLE_TEXT.into()),
        }
    }

    pub fn render(&self, doc: &Document, prompt: &str) -> String {
        let title_or_none = if doc.title.trim().is_empty() {
            "none"
        } else {
            doc.title.as_str()
        };
        self.0
            .replace("{prompt}", prompt)
            .replace("{title_or_none}", title_or_none)
            .replace("{title}", &doc.title)
            .replace("{text}", &doc.text)
    }
}

/// How a model's queries and documents are written out for encoding.
#[derive(Debug, Clone)]
pub struct TextFormat {
    pub template: DocumentTemplate,
    /// The model's `document` prompt (`{prompt}` in the template).
    pub document_prompt: String,
    /// Prepended to every query.
    pub query_prefix: String,
}

impl TextFormat {
    /// The model's own format; `template` and `query_prompt` override it.
    pub fn for_model(
        setup: &EncoderSetup,
        template: Option<DocumentTemplate>,
        query_prompt: Option<Prompt>,
    ) -> Result<Self> {
        Ok(Self {
            template: template.unwrap_or_else(|| DocumentTemplate::for_model(setup)),
            document_prompt: setup
                .sentence
                .prompts
                .get("document")
                .cloned()
                .unwrap_or_default(),
            query_prefix: setup
                .prefix(&query_prompt.unwrap_or_else(|| default_query_prompt(setup)))?,
        })
    }

    pub fn document(&self, doc: &Document) -> String {
        self.template.render(doc, &self.document_prompt)
    }

    pub fn query(&self, text: &str) -> String {
        format!("{}{text}", self.query_prefix)
    }
}

/// The model's `query` prompt if it declares one, else none.
pub fn default_query_prompt(setup: &EncoderSetup) -> Prompt {
    if setup.sentence.prompts.contains_key("query") {
        Prompt::Named("query".into())
    } else {
        Prompt::None
    }
}
