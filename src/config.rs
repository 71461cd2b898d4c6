//! Loading the configuration: core's defaults, then a TOML file (`--config`), then
//! `CLOUDTASK_*` environment variables, then `Config::validate`. An unknown key in the file
//! stops start-up; an unknown `CLOUDTASK_*` variable is reported as a warning.

use std::path::Path;

use cloudtask_core::config::{Config, ConfigError};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};

const ENV_PREFIX: &str = "CLOUDTASK_";

/// The loaded configuration and what was noticed on the way.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// `CLOUDTASK_*` variables that name no key.
    pub unknown_env: Vec<String>,
}

/// Defaults, then `file`, then the given environment (normally `std::env::vars()`).
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, ConfigError> {
    let keys = keys();
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::new(
                "--config",
                format!("{} not found", path.display()),
            ));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let mut unknown_env = Vec::new();
    let mut known_env = Vec::new();
    for (name, value) in env {
        let Some(key) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if keys.contains(&key) {
            known_env.push((key, value));
        } else {
            unknown_env.push(name);
        }
    }
    let defaults = serde_json::to_value(Config::default()).expect("Config serialises");
    for (key, value) in known_env {
        let value = parse_env_value(&value, &defaults[key.as_str()]);
        figment = figment.merge(Serialized::default(&key, value));
    }
    let config: Config = figment.extract().map_err(|e| {
        let key = e.path.last().cloned().unwrap_or_else(|| "config".into());
        ConfigError::new(&key, e.kind.to_string())
    })?;
    config.validate()?;
    unknown_env.sort();
    Ok(Loaded {
        config,
        unknown_env,
    })
}

/// Every key the configuration knows, from the struct itself.
fn keys() -> Vec<String> {
    match serde_json::to_value(Config::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => unreachable!("Config serialises to an object"),
    }
}

/// An environment value typed after the key's default: numbers and booleans for keys
/// that hold them, text for the rest (so a password or a worker name of digits stays text).
fn parse_env_value(value: &str, default: &serde_json::Value) -> figment::value::Value {
    use figment::value::Value;
    match default {
        serde_json::Value::Number(_) => match value.parse::<u64>() {
            Ok(n) => Value::from(n),
            Err(_) => Value::from(value.to_string()),
        },
        serde_json::Value::Bool(_) => match value.parse::<bool>() {
            Ok(b) => Value::from(b),
            Err(_) => Value::from(value.to_string()),
        },
        _ => Value::from(value.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn digits_stay_text_for_text_keys() {
        let loaded = load(
            None,
            env(&[
                ("CLOUDTASK_ADMIN_PASSWORD", "12345678"),
                ("CLOUDTASK_WORKER_NAME", "42"),
                ("CLOUDTASK_WORKER_CAPACITY", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(loaded.config.admin_password.as_deref(), Some("12345678"));
        assert_eq!(loaded.config.worker_name.as_deref(), Some("42"));
        assert_eq!(loaded.config.worker_capacity, 3);
    }

    #[test]
    fn defaults_then_file_then_env() {
        let dir = std::env::temp_dir().join(format!("cloudtask-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "listen = \"0.0.0.0:9000\"\nlogin_max_attempts = 7\n").unwrap();
        let loaded = load(
            Some(&file),
            env(&[
                ("CLOUDTASK_LOGIN_MAX_ATTEMPTS", "9"),
                ("CLOUDTASK_DATABASE_URL", "postgres://x@y/z"),
                ("CLOUDTASK_NOPE", "1"),
                ("HOME", "/"),
            ]),
        )
        .unwrap();
        assert_eq!(loaded.config.listen.port(), 9000);
        assert_eq!(loaded.config.login_max_attempts, 9);
        assert_eq!(loaded.config.database_url, "postgres://x@y/z");
        assert_eq!(loaded.unknown_env, vec!["CLOUDTASK_NOPE".to_string()]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = load(None, env(&[("CLOUDTASK_LISTEN", "not an address")])).unwrap_err();
        assert_eq!(err.key, "listen");
        let err = load(
            None,
            env(&[("CLOUDTASK_ZOOKEEPER_SESSION_TIMEOUT_MS", "5")]),
        )
        .unwrap_err();
        assert_eq!(err.key, "zookeeper_session_timeout_ms");
        let err = load(None, env(&[("CLOUDTASK_JWT_SECRET", "short")])).unwrap_err();
        assert_eq!(err.key, "jwt_secret");
        let err = load(None, env(&[("CLOUDTASK_LOGIN_MAX_ATTEMPTS", "many")])).unwrap_err();
        assert_eq!(err.key, "login_max_attempts");
    }

    #[test]
    fn unknown_key_in_file_is_an_error() {
        let dir = std::env::temp_dir().join(format!("cloudtask-config-u-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "lisen = \"0.0.0.0:9000\"\n").unwrap();
        let err = load(Some(&file), env(&[])).unwrap_err();
        assert!(err.message.contains("lisen"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
