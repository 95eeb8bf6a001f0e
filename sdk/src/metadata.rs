//! What a plugin says about itself: the contract's `metadata` interface.
//!
//! ```
//! use dbmazz_sdk::{ConfigType, Metadata};
//! let m = Metadata::keys()
//!     .required("url", ConfigType::Text, "where batches go (http://host:port/path)")
//!     .key("timeout_ms", ConfigType::Integer, Some("10000"), "per request, ms")
//!     .memory_mb(32);
//! assert_eq!(m.config.len(), 2);
//! ```
//!
//! The host calls `describe` on a fresh instance before `init` and refuses to start the
//! stage, with every problem named, when its `config` table sets a key the plugin does
//! not declare (unless [`Metadata::any`]), a value of another type, leaves out a required
//! key, or its `limits.memory_mb` is below [`Metadata::memory_mb`]. Keys starting with
//! `dbmazz.` are the host's and always pass.

use crate::bindings::sink;

/// The type of a configuration key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigType {
    /// A TOML string.
    Text,
    /// A TOML integer (or a string holding one).
    Integer,
    /// A TOML float or integer (or a string holding one).
    Float,
    /// A TOML boolean (or `"true"` / `"false"`).
    Boolean,
    /// A TOML array.
    Array,
    /// A TOML table.
    Table,
    /// Any value.
    Any,
}

/// One configuration key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// The key.
    pub name: String,
    /// Its type.
    pub value_type: ConfigType,
    /// True when the stage must set it.
    pub required: bool,
    /// The default, as text, for docs and `inspect`.
    pub default_value: Option<String>,
    /// What it does.
    pub description: String,
}

/// A plugin's description of itself. Name, version and description default to the
/// plugin crate's `Cargo.toml` (`export_sink!` fills them in).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Name; the crate's name when empty.
    pub name: String,
    /// The plugin's version; the crate's when empty.
    pub version: String,
    /// One line; the crate's description when empty.
    pub description: String,
    /// The keys it takes.
    pub config: Vec<Key>,
    /// True: keys not in `config` are allowed.
    pub other_keys: bool,
    /// Linear memory it needs, MiB.
    pub memory_mb: Option<u32>,
}

impl Metadata {
    /// Declares nothing and takes any key (what a plugin that does not override
    /// `metadata` says).
    pub fn any() -> Self {
        Metadata {
            other_keys: true,
            ..Metadata::default()
        }
    }

    /// Takes exactly the keys declared with [`Metadata::key`] and [`Metadata::required`].
    pub fn keys() -> Self {
        Metadata::default()
    }

    /// An optional key with its default (as text, for the docs).
    pub fn key(
        mut self,
        name: &str,
        value_type: ConfigType,
        default_value: Option<&str>,
        description: &str,
    ) -> Self {
        self.config.push(Key {
            name: name.into(),
            value_type,
            required: false,
            default_value: default_value.map(str::to_string),
            description: description.into(),
        });
        self
    }

    /// A key the stage must set.
    pub fn required(mut self, name: &str, value_type: ConfigType, description: &str) -> Self {
        self.config.push(Key {
            name: name.into(),
            value_type,
            required: true,
            default_value: None,
            description: description.into(),
        });
        self
    }

    /// The linear memory the plugin needs, MiB.
    pub fn memory_mb(mut self, mb: u32) -> Self {
        self.memory_mb = Some(mb);
        self
    }

    /// One line on what the plugin does.
    pub fn description(mut self, text: &str) -> Self {
        self.description = text.into();
        self
    }

    #[doc(hidden)]
    pub fn or_package(mut self, name: &str, version: &str, description: &str) -> Self {
        if self.name.is_empty() {
            self.name = name.into();
        }
        if self.version.is_empty() {
            self.version = version.into();
        }
        if self.description.is_empty() {
            self.description = description.into();
        }
        self
    }
}

impl From<Metadata> for sink::dbmazz::plugin::metadata::PluginMetadata {
    fn from(m: Metadata) -> Self {
        use sink::dbmazz::plugin::metadata::{ConfigKey, ConfigType as T};
        Self {
            name: m.name,
            version: m.version,
            description: m.description,
            config: m
                .config
                .into_iter()
                .map(|k| ConfigKey {
                    name: k.name,
                    value_type: match k.value_type {
                        ConfigType::Text => T::Text,
                        ConfigType::Integer => T::Integer,
                        ConfigType::Float => T::Float,
                        ConfigType::Boolean => T::Boolean,
                        ConfigType::Array => T::Array,
                        ConfigType::Table => T::Table,
                        ConfigType::Any => T::Any,
                    },
                    required: k.required,
                    default_value: k.default_value,
                    description: k.description,
                })
                .collect(),
            other_keys: m.other_keys,
            memory_mb: m.memory_mb,
        }
    }
}
