//! What a plugin says about itself (the `metadata` interface of contract 0.3), and the
//! checks the host makes with it before `init`: every configuration key is one the
//! plugin accepts, of the type it declared, every required key is set, and the stage's
//! `limits.memory_mb` covers what the plugin needs.

use super::bindings::sink as s3;
use super::contract::ConfigValue;

/// The type of a configuration key (`metadata.config-type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigType {
    /// A TOML string.
    Text,
    /// A TOML integer (or a string holding one).
    Integer,
    /// A TOML float or integer (or a string holding one).
    Float,
    /// A TOML boolean (or the string `"true"` / `"false"`).
    Boolean,
    /// A TOML array.
    Array,
    /// A TOML table.
    Table,
    /// Any value.
    Any,
}

impl ConfigType {
    /// `string`, `integer`, ... as a TOML user calls them.
    pub fn name(self) -> &'static str {
        match self {
            ConfigType::Text => "string",
            ConfigType::Integer => "integer",
            ConfigType::Float => "float",
            ConfigType::Boolean => "boolean",
            ConfigType::Array => "array",
            ConfigType::Table => "table",
            ConfigType::Any => "any",
        }
    }

    /// `a string`, `an integer`, ...
    pub fn with_article(self) -> String {
        let n = self.name();
        let a = if n.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!("{a} {n}")
    }

    fn accepts(self, v: &ConfigValue) -> bool {
        match (self, v) {
            (ConfigType::Any, _)
            | (ConfigType::Text, ConfigValue::Text(_))
            | (ConfigType::Integer, ConfigValue::Integer(_))
            | (ConfigType::Float, ConfigValue::Float(_) | ConfigValue::Integer(_))
            | (ConfigType::Boolean, ConfigValue::Boolean(_)) => true,
            // TOML users quote numbers and booleans; a string that parses is accepted
            (ConfigType::Integer, ConfigValue::Text(s)) => s.trim().parse::<i64>().is_ok(),
            (ConfigType::Float, ConfigValue::Text(s)) => s.trim().parse::<f64>().is_ok(),
            (ConfigType::Boolean, ConfigValue::Text(s)) => matches!(s.trim(), "true" | "false"),
            (ConfigType::Array, ConfigValue::Json(s)) => s.starts_with('['),
            (ConfigType::Table, ConfigValue::Json(s)) => s.starts_with('{'),
            _ => false,
        }
    }
}

fn value_type(v: &ConfigValue) -> &'static str {
    match v {
        ConfigValue::Text(_) => "a string",
        ConfigValue::Integer(_) => "an integer",
        ConfigValue::Float(_) => "a float",
        ConfigValue::Boolean(_) => "a boolean",
        ConfigValue::Json(s) if s.starts_with('[') => "an array",
        ConfigValue::Json(_) => "a table",
    }
}

/// One configuration key a plugin accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigKey {
    /// The key.
    pub name: String,
    /// Its type.
    pub value_type: ConfigType,
    /// True when the stage must set it.
    pub required: bool,
    /// The plugin's default, as text.
    pub default_value: Option<String>,
    /// What it does.
    pub description: String,
}

/// A plugin's description of itself (`metadata.plugin-metadata`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginMetadata {
    /// Name (`sink-webhook`).
    pub name: String,
    /// The plugin's own version.
    pub version: String,
    /// One line on what it does.
    pub description: String,
    /// The keys it accepts.
    pub config: Vec<ConfigKey>,
    /// True: keys it does not declare are allowed.
    pub other_keys: bool,
    /// Linear memory it needs, MiB.
    pub memory_mb: Option<u32>,
}

impl From<s3::dbmazz::plugin::metadata::PluginMetadata> for PluginMetadata {
    fn from(m: s3::dbmazz::plugin::metadata::PluginMetadata) -> Self {
        use s3::dbmazz::plugin::metadata::ConfigType as T;
        PluginMetadata {
            name: m.name,
            version: m.version,
            description: m.description,
            config: m
                .config
                .into_iter()
                .map(|k| ConfigKey {
                    name: k.name,
                    value_type: match k.value_type {
                        T::Text => ConfigType::Text,
                        T::Integer => ConfigType::Integer,
                        T::Float => ConfigType::Float,
                        T::Boolean => ConfigType::Boolean,
                        T::Array => ConfigType::Array,
                        T::Table => ConfigType::Table,
                        T::Any => ConfigType::Any,
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

/// Keys the host itself adds to every stage's configuration (`dbmazz.pipeline_id`).
pub const HOST_KEY_PREFIX: &str = "dbmazz.";

impl PluginMetadata {
    /// Checks a stage's configuration and memory limit against what the plugin declared.
    ///
    /// # Errors
    /// Every problem, one per line: an undeclared key (with the closest declared one), a
    /// value of another type, a required key that is missing, `memory_mb` below the
    /// plugin's need.
    pub fn check(&self, config: &[(String, ConfigValue)], memory_mb: u64) -> Result<(), String> {
        let mut problems = Vec::new();
        for (key, value) in config {
            if key.starts_with(HOST_KEY_PREFIX) {
                continue;
            }
            match self.config.iter().find(|k| k.name == *key) {
                Some(k) if !k.value_type.accepts(value) => problems.push(format!(
                    "config.{key} is {}, but {} takes {}",
                    value_type(value),
                    self.name,
                    k.value_type.with_article()
                )),
                Some(_) => {}
                None if self.other_keys => {}
                None => {
                    let near = self
                        .config
                        .iter()
                        .map(|k| (strsim::jaro_winkler(&k.name, key), &k.name))
                        .filter(|(similar, _)| *similar >= 0.8)
                        .max_by(|a, b| a.0.total_cmp(&b.0));
                    let known: Vec<&str> = self.config.iter().map(|k| k.name.as_str()).collect();
                    problems.push(match near {
                        Some((_, n)) => format!(
                            "config.{key} is not a key of {}: did you mean `{n}`?",
                            self.name
                        ),
                        None => format!(
                            "config.{key} is not a key of {} (it takes: {})",
                            self.name,
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    });
                }
            }
        }
        for k in self.config.iter().filter(|k| k.required) {
            if !config.iter().any(|(key, _)| *key == k.name) {
                problems.push(format!(
                    "config.{} is required by {}: {}",
                    k.name, self.name, k.description
                ));
            }
        }
        if let Some(need) = self.memory_mb {
            if u64::from(need) > memory_mb {
                problems.push(format!(
                    "{} needs {need} MiB of memory (its metadata), but limits.memory_mb is {memory_mb}: set limits = {{ memory_mb = {need} }} or more",
                    self.name
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> PluginMetadata {
        let key = |name: &str, value_type, required| ConfigKey {
            name: name.into(),
            value_type,
            required,
            default_value: None,
            description: format!("the {name}"),
        };
        PluginMetadata {
            name: "sink-x".into(),
            version: "1.0.0".into(),
            description: String::new(),
            config: vec![
                key("url", ConfigType::Text, true),
                key("batch_bytes", ConfigType::Integer, false),
                key("ratio", ConfigType::Float, false),
                key("tables", ConfigType::Array, false),
            ],
            other_keys: false,
            memory_mb: Some(96),
        }
    }

    fn text(s: &str) -> ConfigValue {
        ConfigValue::Text(s.into())
    }

    #[test]
    fn a_config_that_fits_passes() {
        let c = vec![
            ("url".into(), text("http://x")),
            ("batch_bytes".into(), ConfigValue::Integer(5)),
            ("ratio".into(), ConfigValue::Integer(1)),
            ("batch_bytes".into(), text(" 7")),
            ("tables".into(), ConfigValue::Json("[\"a\"]".into())),
            ("dbmazz.pipeline_id".into(), text("p")),
        ];
        assert_eq!(meta().check(&c, 128), Ok(()));
    }

    #[test]
    fn every_problem_is_named() {
        let c = vec![
            ("batch_byte".into(), ConfigValue::Integer(5)),
            ("ratio".into(), text("high")),
            ("tables".into(), ConfigValue::Json("{}".into())),
            ("zzz".into(), ConfigValue::Boolean(true)),
        ];
        let e = meta().check(&c, 64).unwrap_err();
        for want in [
            "config.batch_byte is not a key of sink-x: did you mean `batch_bytes`?",
            "config.ratio is a string, but sink-x takes a float",
            "config.tables is a table, but sink-x takes an array",
            "config.zzz is not a key of sink-x (it takes: url, batch_bytes, ratio, tables)",
            "config.url is required by sink-x: the url",
            "sink-x needs 96 MiB of memory (its metadata), but limits.memory_mb is 64",
        ] {
            assert!(e.contains(want), "{want:?} not in {e}");
        }
    }

    #[test]
    fn other_keys_pass_when_the_plugin_allows_them() {
        let mut m = meta();
        m.other_keys = true;
        m.memory_mb = None;
        let c = vec![("url".into(), text("u")), ("anything".into(), text("v"))];
        assert_eq!(m.check(&c, 1), Ok(()));
    }
}
