//! Roles and the permission matrix. The matrix lives here, once; the catalogue's
//! tenant handle asks it before every operation, and the README prints it.

use serde::{Deserialize, Serialize};

/// A member's role in a tenant, from most to least powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Role {
    Owner,
    Admin,
    Operator,
    Viewer,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Owner, Role::Admin, Role::Operator, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "OWNER",
            Role::Admin => "ADMIN",
            Role::Operator => "OPERATOR",
            Role::Viewer => "VIEWER",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether this role may perform `action`. The whole matrix, in one place.
    pub fn allows(self, action: Action) -> bool {
        use Action::*;
        match action {
            Read => true,
            RunTask | StopRun | PauseTask | EditTask | UploadPackage => self <= Role::Operator,
            ManageClusters | ManageMembers | ReadAudit | ManageNotifications | ManageRetention => {
                self <= Role::Admin
            }
            // Only an owner may make or unmake owners (or change an owner's role).
            ManageOwners => self == Role::Owner,
        }
    }
}

/// Everything a member can do in a tenant, as the permission matrix sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Read clusters, tasks, runs, members, the dashboard.
    Read,
    /// Create, update, clone, delete tasks.
    EditTask,
    UploadPackage,
    PauseTask,
    RunTask,
    StopRun,
    /// Create, delete clusters; rotate join tokens.
    ManageClusters,
    /// Add and remove members, change roles below owner.
    ManageMembers,
    /// Grant or take the OWNER role, remove an owner.
    ManageOwners,
    ReadAudit,
    /// Set the tenant's default recipients and webhook.
    ManageNotifications,
    /// Set how long the tenant's runs, lines and audit entries are kept.
    ManageRetention,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_is_monotonic_in_role_power() {
        let actions = [
            Action::Read,
            Action::EditTask,
            Action::UploadPackage,
            Action::PauseTask,
            Action::RunTask,
            Action::StopRun,
            Action::ManageClusters,
            Action::ManageMembers,
            Action::ManageOwners,
            Action::ReadAudit,
            Action::ManageNotifications,
            Action::ManageRetention,
        ];
        for action in actions {
            for pair in Role::ALL.windows(2) {
                // A weaker role never may what a stronger one may not.
                assert!(
                    !pair[1].allows(action) || pair[0].allows(action),
                    "{action:?}"
                );
            }
        }
        assert!(Role::Viewer.allows(Action::Read));
        assert!(!Role::Viewer.allows(Action::EditTask));
        assert!(Role::Operator.allows(Action::RunTask));
        assert!(!Role::Operator.allows(Action::ManageClusters));
        assert!(Role::Admin.allows(Action::ManageMembers));
        assert!(!Role::Admin.allows(Action::ManageOwners));
    }
}
