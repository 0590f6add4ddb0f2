//! Everything around a model's backbone that turns text into its input and
//! says how its output becomes an embedding: `config.json`, the
//! sentence-transformers modules, the pooling, the tokenizer and its
//! settings. Shared by the candle [`crate::Embedder`] and the ONNX Runtime
//! encoder, so both see exactly the same token ids.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::error::{Error, Result};
use crate::model::arch::{Architecture, ModelConfig, ModelInput};
use crate::model::pooling::Pooling;
use crate::model::sentence_transformers::SentenceConfig;
use crate::model::text_encoder::{
    tokenizer_max_length, EncodedText, PaddingSide, TextEncoder, TextEncoderSettings,
};

/// Choices a caller may make when loading a model; `None` takes the model's own.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Maximum tokens per text (default: `sentence_bert_config.json`, then
    /// `tokenizer_config.json`, then `max_position_embeddings`).
    pub max_length: Option<usize>,
    /// Pooling (default: `1_Pooling/config.json`, else mean for encoders and
    /// last-token for decoders).
    pub pooling: Option<Pooling>,
    /// Append EOS to every text (default: yes for last-token pooling).
    pub append_eos: Option<bool>,
    pub padding_side: Option<PaddingSide>,
}

/// Where an embedding's prefix comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// The model's default prompt, if it declares one; else none.
    Default,
    /// A prompt the model declares by name (`query`, `document`, ...).
    Named(String),
    /// A literal prefix.
    Prefix(String),
    None,
}

/// A model directory's configuration, without its weights.
pub struct EncoderSetup {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub sentence: SentenceConfig,
    pub pooling: Pooling,
    pub text: TextEncoder,
}

/// Texts are batched within consecutive blocks of this many
/// ([`EncoderSetup::for_each_batch`]); corpus shards are whole blocks.
pub const BATCHING_BLOCK: usize = 1024;

impl EncoderSetup {
    /// Reads `dir`'s `config.json`, sentence-transformers files and
    /// tokenizer; `options` override the model's own choices.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
            });
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let sentence = SentenceConfig::load(dir)?;
        let arch = config.architecture();
        let pooling = options
            .pooling
            .or(sentence.pooling)
            .unwrap_or(if arch.is_decoder() {
                Pooling::LastToken
            } else {
                Pooling::Mean
            });

        let position_limit = config.max_position_embeddings;
        let max_length = match options.max_length {
            Some(n) => n,
            None => sentence
                .max_seq_length
                .or(tokenizer_max_length(dir)?)
                .or(position_limit)
                .unwrap_or(512),
        };
        // Learned position embeddings end at their table; rotary ones do not.
        let embeddings = &config.checkpoint().embeddings;
        if embeddings.positions.is_some() {
            if let Some(limit) = position_limit {
                if max_length > limit {
                    return Err(Error::InvalidArgument(format!(
                        "max length {max_length} exceeds the model's {limit} position embeddings"
                    )));
                }
            }
        }
        let mut text_settings = TextEncoderSettings {
            max_length,
            lowercase: sentence.do_lower_case,
            append_eos: None,
            padding_side: options.padding_side,
            pad_id: config.special_tokens.pad_token_id.unwrap_or(0),
            token_type_ids: embeddings.token_types.is_some(),
        };
        let append_eos = options.append_eos.unwrap_or(pooling == Pooling::LastToken);
        let mut text = TextEncoder::load(dir, text_settings.clone())?;
        if append_eos {
            let eos = config
                .special_tokens
                .eos_token_ids
                .first()
                .copied()
                .or_else(|| {
                    ["</s>", "<|endoftext|>", "<eos>"]
                        .iter()
                        .find_map(|t| text.token_id(t))
                })
                .ok_or_else(|| {
                    Error::config(
                        &config.path,
                        "EOS must be appended but no `eos_token_id` is set",
                    )
                })?;
            text_settings.append_eos = Some(eos);
            text = TextEncoder::load(dir, text_settings)?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            sentence,
            pooling,
            text,
        })
    }

    pub fn architecture(&self) -> Architecture {
        self.config.architecture()
    }

    /// Encodes `texts` (with `prefix`) and calls `f` on padded batches of at
    /// most `batch_size` texts of similar length, with the indices of the
    /// batch's texts. Texts are batched within consecutive blocks of
    /// [`BATCHING_BLOCK`], longest first inside each block: similar lengths
    /// waste little padding, and a block is batched the same way whatever
    /// texts come before or after it, so a shard made of whole blocks
    /// (`effir encode --shard`) embeds each text bit for bit as a run over
    /// the whole corpus does.
    pub fn for_each_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
        prefix: &str,
        batch_size: usize,
        device: &Device,
        f: &mut dyn FnMut(&ModelInput, &[usize]) -> Result<()>,
    ) -> Result<()> {
        if batch_size == 0 {
            return Err(Error::InvalidArgument(
                "batch size must be at least 1".into(),
            ));
        }
        let encoded = self.text.encode(texts, prefix)?;
        let indices: Vec<usize> = (0..encoded.len()).collect();
        for block in indices.chunks(BATCHING_BLOCK) {
            let mut order = block.to_vec();
            order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].len()));
            for chunk in order.chunks(batch_size) {
                let batch: Vec<&EncodedText> = chunk.iter().map(|&i| &encoded[i]).collect();
                f(&self.text.batch(&batch, device)?, chunk)?;
            }
        }
        Ok(())
    }

    /// The text prepended to inputs for `prompt`.
    pub fn prefix(&self, prompt: &Prompt) -> Result<String> {
        Ok(match prompt {
            Prompt::Default => match &self.sentence.default_prompt_name {
                Some(name) => self.sentence.prompt(name)?.to_string(),
                None => String::new(),
            },
            Prompt::Named(name) => self.sentence.prompt(name)?.to_string(),
            Prompt::Prefix(prefix) => prefix.clone(),
            Prompt::None => String::new(),
        })
    }
}
