//! `dbmazz plugin new --lang rust|python|js NAME`: writes a working sink project from the
//! templates in `examples/` (embedded in the binary at build time, so what `new` writes is
//! what the tests build and run): the sink, its unit tests against the SDK's test double,
//! a README with the one build command, and a `.gitignore`.
//!
//! The project depends on the SDK by version (crates.io `dbmazz-sdk`, npm `@dbmazz/sdk`,
//! PyPI `dbmazz-sdk`), or on a local checkout's `sdk/` with `--sdk PATH`.

use std::path::{Path, PathBuf};

/// A language `plugin new` writes a project in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust, on the `dbmazz-sdk` crate (`examples/sink-template`).
    Rust,
    /// Python, on the `dbmazz-sdk` package and componentize-py (`examples/sink-python`).
    Python,
    /// JavaScript, on `@dbmazz/sdk` and ComponentizeJS (`examples/sink-js`).
    Js,
}

/// Why a project was not written.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name is not a package name every toolchain accepts.
    #[error("plugin name {0:?}: use lowercase letters, digits and '-', starting with a letter (e.g. my-sink)")]
    BadName(String),
    /// The directory exists.
    #[error("{0} already exists; choose another name or --dir")]
    Exists(PathBuf),
    /// `--sdk` is not a dbmazz checkout's `sdk/` directory.
    #[error("--sdk {0}: not the sdk/ directory of a dbmazz checkout (no Cargo.toml, python/ and js/ in it)")]
    BadSdk(PathBuf),
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The SDK versions a project written without `--sdk` depends on.
const RUST_SDK: &str = "dbmazz-sdk = \"0.1\"";
const JS_SDK: &str = "^0.3.0";

struct Template {
    /// Path in the project, its content.
    files: &'static [(&'static str, &'static str)],
    /// The template's own name, replaced by the project's.
    name: &'static str,
}

const RUST: Template = Template {
    files: &[
        (
            "Cargo.toml",
            include_str!("../../examples/sink-template/Cargo.toml"),
        ),
        (
            "src/lib.rs",
            include_str!("../../examples/sink-template/src/lib.rs"),
        ),
        (
            "README.md",
            include_str!("../../examples/sink-template/README.md"),
        ),
        (".gitignore", "/target\n*.wasm\n"),
        // WebAssembly SIMD for the plugin's JSON and byte searches (wasmtime runs it)
        (
            ".cargo/config.toml",
            include_str!("../../.cargo/config.toml"),
        ),
    ],
    name: "sink-template",
};

const PYTHON: Template = Template {
    files: &[
        ("app.py", include_str!("../../examples/sink-python/app.py")),
        (
            "sink.py",
            include_str!("../../examples/sink-python/sink.py"),
        ),
        (
            "test_sink.py",
            include_str!("../../examples/sink-python/test_sink.py"),
        ),
        (
            "README.md",
            include_str!("../../examples/sink-python/README.md"),
        ),
        (
            ".gitignore",
            "__pycache__/\n.venv/\n.pytest_cache/\n*.wasm\n",
        ),
    ],
    name: "sink-python",
};

const JS: Template = Template {
    files: &[
        (
            "package.json",
            include_str!("../../examples/sink-js/package.json"),
        ),
        ("index.js", include_str!("../../examples/sink-js/index.js")),
        ("sink.js", include_str!("../../examples/sink-js/sink.js")),
        (
            "test/sink.test.js",
            include_str!("../../examples/sink-js/test/sink.test.js"),
        ),
        (
            "README.md",
            include_str!("../../examples/sink-js/README.md"),
        ),
        (".gitignore", "node_modules/\n*.wasm\n"),
    ],
    name: "sink-js",
};

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
}

/// One file of the project: the template's name replaced, the SDK dependency pointed at
/// the registry or at `sdk`.
fn render(lang: Lang, file: &str, text: &str, name: &str, sdk: Option<&Path>) -> String {
    let mut out = match lang {
        Lang::Rust => text
            .replace(
                "A template dbmazz sink: copy this folder to start your own plugin",
                "A dbmazz sink",
            )
            .replace("sink-template", name)
            .replace("sink_template", &name.replace('-', "_")),
        Lang::Python | Lang::Js => {
            let template = if lang == Lang::Python {
                PYTHON.name
            } else {
                JS.name
            };
            text.replace(template, name)
        }
    };
    match (lang, file) {
        (Lang::Rust, "Cargo.toml") => {
            let dep = match sdk {
                Some(p) => format!("dbmazz-sdk = {{ path = {:?} }}", p.display().to_string()),
                None => RUST_SDK.to_string(),
            };
            out = out
                .lines()
                .filter(|l| !l.starts_with("# Outside this repository"))
                .map(|l| {
                    if l.starts_with("dbmazz-sdk =") {
                        dep.clone()
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            // its own workspace, wherever it is created
            out.push_str("\n\n[workspace]\n");
        }
        (Lang::Js, "package.json") => {
            let dep = match sdk {
                Some(p) => format!("file:{}", p.join("js").display()),
                None => JS_SDK.to_string(),
            };
            out = out.replace("file:../../sdk/js", &dep);
        }
        (Lang::Python, "README.md") => {
            let sdk = match sdk {
                Some(p) => p.join("python").display().to_string(),
                None => "dbmazz-sdk".to_string(),
            };
            out = out.replace("../../sdk/python", &sdk);
        }
        (Lang::Js, "README.md") => {
            let sdk = match sdk {
                Some(p) => p.join("js").display().to_string(),
                None => "the npm registry".to_string(),
            };
            out = out.replace("../../sdk/js", &sdk);
        }
        _ => {}
    }
    out
}

/// Writes a sink project named `name` in `dir` (`./NAME` when `None`) and returns its
/// directory and the files written (relative paths).
///
/// # Errors
/// [`ScaffoldError`]: a bad name, an existing directory, an `--sdk` that is not a dbmazz
/// `sdk/` directory, a write that failed.
pub fn new_project(
    lang: Lang,
    name: &str,
    dir: Option<&Path>,
    sdk: Option<&Path>,
) -> Result<(PathBuf, Vec<&'static str>), ScaffoldError> {
    if !valid_name(name) {
        return Err(ScaffoldError::BadName(name.to_string()));
    }
    let sdk = match sdk {
        Some(p) => {
            let ok = p.join("Cargo.toml").is_file()
                && p.join("python").is_dir()
                && p.join("js").is_dir();
            let abs =
                std::fs::canonicalize(p).map_err(|_| ScaffoldError::BadSdk(p.to_path_buf()))?;
            if !ok {
                return Err(ScaffoldError::BadSdk(p.to_path_buf()));
            }
            Some(abs)
        }
        None => None,
    };
    let root = dir.map_or_else(|| PathBuf::from(name), Path::to_path_buf);
    if root.exists() {
        return Err(ScaffoldError::Exists(root));
    }
    let template = match lang {
        Lang::Rust => &RUST,
        Lang::Python => &PYTHON,
        Lang::Js => &JS,
    };
    let mut written = Vec::new();
    for (file, text) in template.files {
        let path = root.join(file);
        let io = |source| ScaffoldError::Io {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&path, render(lang, file, text, name, sdk.as_deref())).map_err(io)?;
        written.push(*file);
    }
    Ok((root, written))
}

/// What to run next, for the command's output.
pub fn next_steps(lang: Lang, root: &Path, name: &str) -> String {
    let dir = root.display();
    match lang {
        Lang::Rust => format!(
            "cd {dir}\ncargo test                                      # unit tests, natively\ncargo build --release --target wasm32-wasip2    # target/wasm32-wasip2/release/{}.wasm\ndbmazz plugin test target/wasm32-wasip2/release/{}.wasm",
            name.replace('-', "_"),
            name.replace('-', "_")
        ),
        Lang::Python => format!(
            "cd {dir}\npython3 -m venv .venv && . .venv/bin/activate && pip install dbmazz-sdk pytest   # (or the checkout's sdk/python)\npython -m pytest\ndbmazz-plugin-build sink app -o {name}.wasm\ndbmazz plugin test {name}.wasm --memory-mb 128"
        ),
        Lang::Js => format!(
            "cd {dir}\nnpm install\nnpm test\nnpm run build                                   # {name}.wasm\ndbmazz plugin test {name}.wasm"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_every_toolchain_accepts() {
        for ok in ["my-sink", "s3", "orders-to-kafka2"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "My-Sink", "1sink", "my_sink", "-x", "x-", "a b", "../x"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_projects_name_and_sdk_replace_the_templates() {
        let cargo = render(Lang::Rust, "Cargo.toml", RUST.files[0].1, "my-sink", None);
        assert!(cargo.contains("name = \"my-sink\""), "{cargo}");
        assert!(cargo.contains("dbmazz-sdk = \"0.1\""), "{cargo}");
        assert!(!cargo.contains("../../sdk"), "{cargo}");
        assert!(cargo.trim_end().ends_with("[workspace]"), "{cargo}");
        let pkg = render(
            Lang::Js,
            "package.json",
            JS.files[0].1,
            "my-sink",
            Some(Path::new("/src/dbmazz/sdk")),
        );
        assert!(pkg.contains("\"name\": \"my-sink\""), "{pkg}");
        assert!(
            pkg.contains("\"@dbmazz/sdk\": \"file:/src/dbmazz/sdk/js\""),
            "{pkg}"
        );
        assert!(pkg.contains("-o my-sink.wasm"), "{pkg}");
        let sink = render(Lang::Python, "sink.py", PYTHON.files[1].1, "my-sink", None);
        assert!(sink.contains("name = \"my-sink\""), "{sink}");
    }

    #[test]
    fn an_existing_directory_or_a_bad_sdk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = new_project(Lang::Js, "x", Some(dir.path()), None).unwrap_err();
        assert!(matches!(e, ScaffoldError::Exists(_)), "{e}");
        let e =
            new_project(Lang::Js, "x", Some(&dir.path().join("x")), Some(dir.path())).unwrap_err();
        assert!(e.to_string().contains("not the sdk/ directory"), "{e}");
        let (root, files) =
            new_project(Lang::Python, "x", Some(&dir.path().join("x")), None).unwrap();
        assert!(files.contains(&"test_sink.py"));
        assert!(root.join("app.py").is_file());
    }
}
