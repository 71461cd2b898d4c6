//! Newtype ids. Their text form is `<prefix>_<uuid simple>` (e.g. `task_0190f3…`), so an id
//! says what it names and one kind cannot be passed where another is expected. A worker
//! is named by its host instead: [`WorkerId`] is that name, checked once.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

macro_rules! id_type {
    ($name:ident, $prefix:literal) => {
        #[derive(
            Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
        )]
        #[serde(into = "String", try_from = "String")]
        pub struct $name(pub Uuid);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A new, time-ordered id (UUID v7), so ordering by id is ordering by creation.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}_{}", $prefix, self.0.simple())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = crate::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.strip_prefix(concat!($prefix, "_"))
                    .and_then(|rest| Uuid::try_parse(rest).ok())
                    .map(Self)
                    .ok_or_else(|| {
                        crate::Error::bad_input("id", format!("not a {} id: {s:?}", $prefix))
                    })
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.to_string()
            }
        }

        impl TryFrom<String> for $name {
            type Error = crate::Error;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }
    };
}

id_type!(TenantId, "tnt");
id_type!(UserId, "usr");
id_type!(ClusterId, "cls");
id_type!(TaskId, "task");
id_type!(RunId, "run");

/// A worker, by the name its host chose (configured, or derived from the hostname). The
/// name is a znode path segment, so it is 1 to 128 letters, digits, '-', '_' or '.', and
/// neither `.` nor `..`. Its text form, in JSON, znodes and the catalogue, is the name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(String);

impl WorkerId {
    pub const MAX_LEN: usize = 128;

    pub fn is_valid(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && name != "."
            && name != ".."
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl TryFrom<String> for WorkerId {
    type Error = crate::Error;
    fn try_from(name: String) -> Result<Self, Self::Error> {
        if Self::is_valid(&name) {
            Ok(WorkerId(name))
        } else {
            Err(crate::Error::bad_input(
                "worker",
                format!(
                    "{name:?} is no worker name: use 1 to 128 letters, digits, '-', '_' or '.'"
                ),
            ))
        }
    }
}

impl FromStr for WorkerId {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.to_owned().try_into()
    }
}

impl From<WorkerId> for String {
    fn from(id: WorkerId) -> String {
        id.0
    }
}

impl AsRef<str> for WorkerId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for WorkerId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for WorkerId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for WorkerId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl serde::Serialize for WorkerId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for WorkerId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .try_into()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips_and_kinds_do_not_mix() {
        let id = TaskId::new();
        let text = id.to_string();
        assert!(text.starts_with("task_"));
        assert_eq!(text.parse::<TaskId>().unwrap(), id);
        assert!(text.parse::<ClusterId>().is_err());
        assert!("task_nope".parse::<TaskId>().is_err());
    }

    #[test]
    fn a_worker_is_its_plain_name() {
        let worker: WorkerId = "host-1.example_a".parse().unwrap();
        assert_eq!(worker.to_string(), "host-1.example_a");
        assert_eq!(
            serde_json::to_string(&worker).unwrap(),
            r#""host-1.example_a""#
        );
        assert_eq!(
            serde_json::from_str::<WorkerId>(r#""host-1.example_a""#).unwrap(),
            worker
        );
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(bad.parse::<WorkerId>().is_err(), "{bad:?}");
            assert!(serde_json::from_str::<WorkerId>(&format!("{bad:?}")).is_err());
        }
        assert!(WorkerId::is_valid(&"x".repeat(128)));
    }
}
