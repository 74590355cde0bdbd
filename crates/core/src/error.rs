//! The one error type of `lmstack-core`: every failure says what was expected, what was found
//! and where (file, JSON field, tensor name).

use std::path::PathBuf;

/// Errors raised by `lmstack-core`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{op} {path}: {cause}")]
    Io {
        /// What was being done (`reading`, `writing`, …).
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error (in the message, not chained, so it prints once).
        cause: std::io::Error,
    },
    /// A JSON file did not parse.
    #[error("{path}:{line}:{column}: {message}")]
    Json {
        /// The file concerned.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What serde reported.
        message: String,
    },
    /// A configuration field is unknown, missing, or inconsistent with another.
    #[error("{file}: field `{field}`: {message}")]
    Config {
        /// The file (or source) holding the configuration.
        file: String,
        /// The offending field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A weight is missing from a checkpoint or has the wrong shape.
    #[error("{file}: tensor `{name}`: {message}")]
    Weight {
        /// The checkpoint file.
        file: String,
        /// The tensor name.
        name: String,
        /// What is wrong with it.
        message: String,
    },
    /// The tokenizer failed or its files are invalid.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A sequence would exceed the model's context length.
    #[error("sequence of {len} tokens exceeds the context length of {max} tokens")]
    ContextOverflow {
        /// The length the sequence would reach.
        len: usize,
        /// The model's maximum.
        max: usize,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// A request to a model or sampler is invalid.
    #[error("invalid argument `{name}`: {message}")]
    InvalidArgument {
        /// The argument's name.
        name: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A field of a request (an API body, a list of messages or tools) is invalid.
    #[error("`{field}`: {message}")]
    Field {
        /// Where: `tools[2].function.parameters`, `messages[3].content` …
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// Constrained decoding failed (llguidance's reason).
    #[error("constrained decoding: {0}")]
    Constraint(String),
    /// An error from candle's tensor operations.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error while doing `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { op, path: path.into(), cause: source }
    }

    /// A JSON error in `path`, with its line and column.
    pub fn json(path: impl Into<PathBuf>, e: &serde_json::Error) -> Self {
        Error::Json { path: path.into(), line: e.line(), column: e.column(), message: e.to_string() }
    }

    /// A configuration error for `field` in `file`.
    pub fn config(file: impl Into<String>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config { file: file.into(), field: field.into(), message: message.into() }
    }

    /// An invalid field of a request, named by its path.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Field { field: field.into(), message: message.into() }
    }

    /// An invalid argument.
    pub fn invalid(name: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument { name, message: message.into() }
    }
}

impl From<tokenizers::Error> for Error {
    fn from(e: tokenizers::Error) -> Self {
        Error::Tokenizer(e.to_string())
    }
}

/// For code that runs inside candle (a custom op's closure): lmstack's error as candle's,
/// candle's own unwrapped.
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(e) => e,
            e => candle_core::Error::Msg(e.to_string()),
        }
    }
}
