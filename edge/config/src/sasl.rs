//! `upstream.sasl`: how the edge authenticates to the brokers of a virtual
//! cluster, and the secret type that keeps the password out of logs.
//!
//! The password is never written in the configuration itself, only where to
//! find it (`password_file` or `password_env`), so a configuration file or a
//! control-plane resource can be shown, diffed and stored without leaking it.
//! It is read while the configuration is validated: `--check-config` reports a
//! missing file or variable, and every reload reads it again.

use std::fmt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::raw::RawSasl;
use crate::{Config, ConfigError};

/// A secret read from a file or the environment. Its `Debug` prints `***`,
/// it has no `Display`, and its memory is zeroized when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(Zeroizing::new(value))
    }

    /// The secret itself: for the wire, never for a log line.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The SASL mechanisms the edge can use towards brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    /// The mechanism's name as Kafka spells it (SaslHandshake, metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        // Kafka compares mechanism names case-sensitively; so does the edge,
        // so that what `--check-config` accepts is what the broker accepts.
        [
            SaslMechanism::Plain,
            SaslMechanism::ScramSha256,
            SaslMechanism::ScramSha512,
        ]
        .into_iter()
        .find(|m| m.as_str() == text)
    }
}

impl fmt::Display for SaslMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a credential is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

impl SecretSource {
    /// Reads the value. A file's trailing line break (`echo pass > file`) is
    /// not part of it. Error messages name the source, never the content.
    pub fn read(&self) -> Result<Secret, String> {
        let text = match self {
            SecretSource::File(path) => read_file(path)?,
            SecretSource::Env(name) => match std::env::var(name) {
                Ok(value) => Zeroizing::new(value),
                Err(std::env::VarError::NotPresent) => {
                    return Err(format!("environment variable {name} is not set"))
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(format!("environment variable {name} is not UTF-8"))
                }
            },
        };
        let trimmed = text.trim_end_matches(['\n', '\r']);
        Ok(Secret::new(trimmed.to_owned()))
    }
}

fn read_file(path: &Path) -> Result<Zeroizing<String>, String> {
    let bytes = Zeroizing::new(
        std::fs::read(path).map_err(|err| format!("cannot read '{}': {err}", path.display()))?,
    );
    match std::str::from_utf8(&bytes) {
        Ok(text) => Ok(Zeroizing::new(text.to_owned())),
        Err(_) => Err(format!("'{}' is not UTF-8", path.display())),
    }
}

/// Validated `upstream.sasl` of a virtual cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sasl {
    pub mechanism: SaslMechanism,
    pub username: String,
    /// `None` when the username is written in the configuration.
    pub username_source: Option<SecretSource>,
    pub password: Secret,
    pub password_source: SecretSource,
}

/// Validates `raw` found at `path` (`virtual_clusters[0].upstream.sasl`),
/// reading the username and password from their sources.
pub fn validate_sasl(raw: &RawSasl, path: &str) -> Result<Sasl, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut push = |field: &str, message: String| {
        errors.push(ConfigError {
            path: if field.is_empty() {
                path.to_owned()
            } else {
                format!("{path}.{field}")
            },
            message,
        })
    };

    let mechanism = SaslMechanism::parse(&raw.mechanism);
    if mechanism.is_none() {
        push(
            "mechanism",
            format!(
                "'{}' is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
                raw.mechanism
            ),
        );
    }
    if raw.password.is_some() {
        push(
            "password",
            "the password is not written in the configuration: use password_file or password_env"
                .into(),
        );
    }

    let username_source = match (&raw.username, &raw.username_file, &raw.username_env) {
        (Some(name), None, None) => Some(Ok((name.clone(), None))),
        (None, Some(file), None) => Some(Err(SecretSource::File(PathBuf::from(file)))),
        (None, None, Some(env)) => Some(Err(SecretSource::Env(env.clone()))),
        (None, None, None) => {
            push(
                "username",
                "required (or username_file, username_env)".into(),
            );
            None
        }
        _ => {
            push(
                "",
                "use exactly one of username, username_file, username_env".into(),
            );
            None
        }
    };
    let username = match username_source {
        Some(Ok(inline)) => Some(inline),
        Some(Err(source)) => {
            let field = source_field("username", &source);
            match source.read() {
                Ok(value) => Some((value.expose().to_owned(), Some(source))),
                Err(message) => {
                    push(field, message);
                    None
                }
            }
        }
        None => None,
    };
    if let Some((name, source)) = &username {
        let field = source
            .as_ref()
            .map_or("username", |s| source_field("username", s));
        if name.is_empty() {
            push(field, "the username is empty".into());
        } else if name.contains('\0') {
            // PLAIN separates its fields with NUL; such a name cannot be sent.
            push(field, "the username contains a NUL character".into());
        }
    }

    let password_source = match (&raw.password_file, &raw.password_env) {
        (Some(file), None) => Some(SecretSource::File(PathBuf::from(file))),
        (None, Some(env)) => Some(SecretSource::Env(env.clone())),
        (None, None) => {
            if raw.password.is_none() {
                push(
                    "",
                    "a password source is required: password_file or password_env".into(),
                );
            }
            None
        }
        (Some(_), Some(_)) => {
            push(
                "",
                "use either password_file or password_env, not both".into(),
            );
            None
        }
    };
    let password = password_source.as_ref().and_then(|source| {
        let field = source_field("password", source);
        match source.read() {
            Ok(secret) if secret.expose().is_empty() => {
                push(field, "the password is empty".into());
                None
            }
            Ok(secret) if secret.expose().contains('\0') => {
                push(field, "the password contains a NUL character".into());
                None
            }
            Ok(secret) => Some(secret),
            Err(message) => {
                push(field, message);
                None
            }
        }
    });

    match (mechanism, username, password, password_source) {
        (Some(mechanism), Some((username, username_source)), Some(password), Some(source))
            if errors.is_empty() =>
        {
            Ok(Sasl {
                mechanism,
                username,
                username_source,
                password,
                password_source: source,
            })
        }
        _ => Err(errors),
    }
}

fn source_field(what: &str, source: &SecretSource) -> &'static str {
    match (what, source) {
        ("username", SecretSource::File(_)) => "username_file",
        ("username", SecretSource::Env(_)) => "username_env",
        (_, SecretSource::File(_)) => "password_file",
        (_, SecretSource::Env(_)) => "password_env",
    }
}

/// What the credential files named by `config` hold now (`None` where one
/// cannot be read). The edge compares this from one check to the next, so a
/// rotated password file is picked up without an edit of the configuration;
/// comparing with the previous check rather than with the running
/// configuration reports a broken file once, not on every check.
pub fn read_credential_files(config: &Config) -> Vec<Option<Secret>> {
    let mut contents = Vec::new();
    for sasl in config
        .virtual_clusters
        .iter()
        .filter_map(|vc| vc.upstream.sasl.as_ref())
    {
        for source in [sasl.username_source.as_ref(), Some(&sasl.password_source)]
            .into_iter()
            .flatten()
        {
            if matches!(source, SecretSource::File(_)) {
                contents.push(source.read().ok());
            }
        }
    }
    contents
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use crate::{parse, read_credential_files, SaslMechanism, SecretSource};

    fn yaml(sasl: &str) -> String {
        format!(
            r#"
virtual_clusters:
  - name: local
    bootstrap: 127.0.0.1:19092
    brokers: {{ advertised_host: 127.0.0.1, port_range: 19100-19199 }}
    upstream:
      bootstrap_servers: [127.0.0.1:9092]
      sasl: {sasl}
"#
        )
    }

    fn secret_file(content: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(content.as_bytes()).unwrap();
        file
    }

    fn paths(yaml: &str) -> Vec<String> {
        parse(yaml)
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const SASL: &str = "virtual_clusters[0].upstream.sasl";

    #[test]
    fn password_file_is_read_without_its_line_break_and_never_shown() {
        let file = secret_file("alice-secret\n");
        let config = parse(&yaml(&format!(
            "{{ mechanism: SCRAM-SHA-256, username: alice, password_file: '{}' }}",
            file.path().display()
        )))
        .unwrap();
        let sasl = config.virtual_clusters[0].upstream.sasl.as_ref().unwrap();
        assert_eq!(sasl.mechanism, SaslMechanism::ScramSha256);
        assert_eq!(sasl.username, "alice");
        assert_eq!(sasl.password.expose(), "alice-secret");
        assert_eq!(
            sasl.password_source,
            SecretSource::File(file.path().to_owned())
        );
        let debug = format!("{config:?}");
        assert!(!debug.contains("alice-secret"), "{debug}");
        assert!(debug.contains("password: ***"), "{debug}");
    }

    #[test]
    fn password_env_and_username_file() {
        std::env::set_var("STRAIT_TEST_SASL_PASSWORD_A", "from-env");
        let user = secret_file("svc-edge\r\n");
        let config = parse(&yaml(&format!(
            "{{ mechanism: PLAIN, username_file: '{}', password_env: STRAIT_TEST_SASL_PASSWORD_A }}",
            user.path().display()
        )))
        .unwrap();
        let sasl = config.virtual_clusters[0].upstream.sasl.as_ref().unwrap();
        assert_eq!(sasl.mechanism, SaslMechanism::Plain);
        assert_eq!(sasl.username, "svc-edge");
        assert_eq!(sasl.password.expose(), "from-env");
        assert_eq!(
            sasl.password_source,
            SecretSource::Env("STRAIT_TEST_SASL_PASSWORD_A".into())
        );
    }

    #[test]
    fn no_password_source_or_two_of_them() {
        let errors = paths(&yaml("{ mechanism: PLAIN, username: a }"));
        assert_eq!(
            errors,
            vec![format!(
                "{SASL}: a password source is required: password_file or password_env"
            )]
        );
        let file = secret_file("x");
        let errors = paths(&yaml(&format!(
            "{{ mechanism: PLAIN, username: a, password_env: X, password_file: '{}' }}",
            file.path().display()
        )));
        assert_eq!(
            errors,
            vec![format!(
                "{SASL}: use either password_file or password_env, not both"
            )]
        );
    }

    #[test]
    fn unknown_mechanism_missing_file_and_missing_env_are_all_reported() {
        let errors = paths(&yaml(
            "{ mechanism: GSSAPI, username_env: STRAIT_TEST_SASL_UNSET_USER, password_file: /nonexistent/strait-password }",
        ));
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert_eq!(
            errors[0],
            format!("{SASL}.mechanism: 'GSSAPI' is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512")
        );
        assert_eq!(
            errors[1],
            format!(
                "{SASL}.username_env: environment variable STRAIT_TEST_SASL_UNSET_USER is not set"
            )
        );
        assert!(
            errors[2].starts_with(&format!(
                "{SASL}.password_file: cannot read '/nonexistent/strait-password': "
            )),
            "{errors:?}"
        );
        // Lower case is not what a broker accepts either.
        let errors = paths(&yaml(
            "{ mechanism: plain, username: a, password_env: STRAIT_TEST_SASL_PASSWORD_A }",
        ));
        assert!(errors[0].starts_with(&format!("{SASL}.mechanism: 'plain'")));
    }

    #[test]
    fn an_inline_password_is_refused_without_echoing_it() {
        let errors = paths(&yaml(
            "{ mechanism: PLAIN, username: a, password: hunter2-inline }",
        ));
        assert_eq!(
            errors,
            vec![format!(
                "{SASL}.password: the password is not written in the configuration: use password_file or password_env"
            )]
        );
        assert!(!errors[0].contains("hunter2"));
    }

    #[test]
    fn unknown_keys_empty_values_and_username_conflicts() {
        let errors = parse(&yaml(
            "{ mechanism: PLAIN, username: a, pasword_file: /tmp/x }",
        ))
        .unwrap_err()
        .0;
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, format!("{SASL}.pasword_file"));
        assert!(
            errors[0].message.contains("unknown field `pasword_file`"),
            "{errors:?}"
        );

        let empty = secret_file("\n");
        let errors = paths(&yaml(&format!(
            "{{ mechanism: SCRAM-SHA-512, username: a, username_env: U, password_file: '{}' }}",
            empty.path().display()
        )));
        assert_eq!(
            errors,
            vec![
                format!("{SASL}: use exactly one of username, username_file, username_env"),
                format!("{SASL}.password_file: the password is empty"),
            ]
        );
        std::env::set_var("STRAIT_TEST_SASL_PASSWORD_A", "from-env");
        let errors = paths(&yaml(
            "{ mechanism: PLAIN, password_env: STRAIT_TEST_SASL_PASSWORD_A }",
        ));
        assert_eq!(
            errors,
            vec![format!(
                "{SASL}.username: required (or username_file, username_env)"
            )]
        );
    }

    #[test]
    fn a_rewritten_password_file_is_noticed() {
        let file = secret_file("first");
        let user = secret_file("alice");
        let config = parse(&yaml(&format!(
            "{{ mechanism: SCRAM-SHA-512, username_file: '{}', password_file: '{}' }}",
            user.path().display(),
            file.path().display()
        )))
        .unwrap();
        let loaded = read_credential_files(&config);
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[1].as_ref().unwrap().expose(), "first");
        std::fs::write(file.path(), "first\n").unwrap();
        assert_eq!(
            read_credential_files(&config),
            loaded,
            "only the line break differs"
        );
        std::fs::write(file.path(), "second").unwrap();
        let rotated = read_credential_files(&config);
        assert_ne!(rotated, loaded);
        drop(file);
        assert_eq!(read_credential_files(&config)[1], None, "unreadable");
        // Environment variables are not files: nothing to watch.
        std::env::set_var("STRAIT_TEST_SASL_PASSWORD_B", "from-env");
        let env = parse(&yaml(
            "{ mechanism: PLAIN, username: a, password_env: STRAIT_TEST_SASL_PASSWORD_B }",
        ))
        .unwrap();
        assert!(read_credential_files(&env).is_empty());
    }
}
