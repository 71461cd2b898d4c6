//! Newtype ids. Their text form is `<prefix>_<uuid simple>` (e.g. `task_0190f3…`), so an id
//! says what it names and one kind cannot be passed where another is expected.

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
id_type!(WorkerId, "wrk");

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
}
