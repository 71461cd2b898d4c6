//! The role matrix over HTTP: every tenant query and mutation, called by a member of each
//! role, is either allowed or refused with FORBIDDEN and changes nothing. The operations
//! come from the live schema, so one added without a row in the matrix fails the test.

use std::collections::BTreeSet;

use cloudtask_core::archive::samples;
use cloudtask_testkit::{Gql, TestApi};
use serde_json::{Value, json};

use crate::isolation::{introspect, snapshot};
use crate::support::{CREATE_TASK, PASSWORD, World, add_run, task_input};

const ROLES: [&str; 4] = ["OWNER", "ADMIN", "OPERATOR", "VIEWER"];

/// Every case, in the order they run. A case is an operation, with the variant in
/// parentheses where the role needed depends on the arguments.
const CASES: &[&str] = &[
    // Queries.
    "me",
    "tenant",
    "tenants",
    "clusters",
    "cluster",
    "tasks",
    "task",
    "runs",
    "run",
    "members",
    "dashboard",
    "auditLog",
    "notificationSettings",
    "retention",
    // Mutations.
    "createTask",
    "createTask(package)",
    "updateTask",
    "cloneTask",
    "deleteTask",
    "uploadPackage",
    "pauseTask",
    "resumeTask",
    "runTaskNow",
    "stopRun",
    "createCluster",
    "rotateClusterToken",
    "setClusterLimits",
    "deleteCluster",
    "addMember(VIEWER)",
    "addMember(OWNER)",
    "setMemberRole(VIEWER->OPERATOR)",
    "setMemberRole(VIEWER->OWNER)",
    "setMemberRole(OWNER->VIEWER)",
    "removeMember(VIEWER)",
    "removeMember(OWNER)",
    "setNotificationSettings",
    "setRetention",
];

/// Role → the cases it may perform in its tenant (see `Role::allows` in core/src/roles.rs).
/// Every case not listed for a role must answer FORBIDDEN to it. `tenants` is listed for
/// no role: it is for platform admins only.
#[rustfmt::skip]
const ALLOWED: [(&str, &[&str]); 4] = [
    ("OWNER", &[
        /* Read           */ "me", "tenant", "clusters", "cluster", "tasks", "task", "runs", "run", "members", "dashboard", "notificationSettings", "retention",
        /* EditTask       */ "createTask", "updateTask", "cloneTask", "deleteTask",
        /* UploadPackage  */ "createTask(package)", "uploadPackage",
        /* PauseTask      */ "pauseTask", "resumeTask",
        /* RunTask/StopRun */ "runTaskNow", "stopRun",
        /* ManageClusters */ "createCluster", "rotateClusterToken", "setClusterLimits", "deleteCluster",
        /* ManageMembers  */ "addMember(VIEWER)", "setMemberRole(VIEWER->OPERATOR)", "removeMember(VIEWER)",
        /* ReadAudit      */ "auditLog",
        /* Notifications  */ "setNotificationSettings",
        /* Retention      */ "setRetention",
        /* ManageOwners   */ "addMember(OWNER)", "setMemberRole(VIEWER->OWNER)",
                             "setMemberRole(OWNER->VIEWER)", "removeMember(OWNER)",
    ]),
    ("ADMIN", &[
        /* Read           */ "me", "tenant", "clusters", "cluster", "tasks", "task", "runs", "run", "members", "dashboard", "notificationSettings", "retention",
        /* EditTask       */ "createTask", "updateTask", "cloneTask", "deleteTask",
        /* UploadPackage  */ "createTask(package)", "uploadPackage",
        /* PauseTask      */ "pauseTask", "resumeTask",
        /* RunTask/StopRun */ "runTaskNow", "stopRun",
        /* ManageClusters */ "createCluster", "rotateClusterToken", "setClusterLimits", "deleteCluster",
        /* ManageMembers  */ "addMember(VIEWER)", "setMemberRole(VIEWER->OPERATOR)", "removeMember(VIEWER)",
        /* ReadAudit      */ "auditLog",
        /* Notifications  */ "setNotificationSettings",
        /* Retention      */ "setRetention",
    ]),
    ("OPERATOR", &[
        /* Read           */ "me", "tenant", "clusters", "cluster", "tasks", "task", "runs", "run", "members", "dashboard", "notificationSettings", "retention",
        /* EditTask       */ "createTask", "updateTask", "cloneTask", "deleteTask",
        /* UploadPackage  */ "createTask(package)", "uploadPackage",
        /* PauseTask      */ "pauseTask", "resumeTask",
        /* RunTask/StopRun */ "runTaskNow", "stopRun",
    ]),
    ("VIEWER", &[
        /* Read           */ "me", "tenant", "clusters", "cluster", "tasks", "task", "runs", "run", "members", "dashboard", "notificationSettings", "retention",
    ]),
];

/// Mutations outside the tenant matrix, each with its own test below.
const EXEMPT_MUTATIONS: [&str; 4] = ["login", "refreshToken", "logout", "createTenant"];

fn operation(case: &str) -> &str {
    case.split('(').next().unwrap()
}

fn allowed(role: &str, case: &str) -> bool {
    ALLOWED
        .iter()
        .find(|(r, _)| *r == role)
        .unwrap_or_else(|| panic!("{role} has a row"))
        .1
        .contains(&case)
}

fn text(value: &Value) -> String {
    value
        .as_str()
        .unwrap_or_else(|| panic!("a string: {value}"))
        .to_owned()
}

#[tokio::test]
async fn every_operation_has_a_row_in_the_matrix() {
    let api = TestApi::start().await;
    // Introspection is for signed-in callers.
    api.create_user("reader@example.com", crate::support::PASSWORD, false)
        .await;
    let reader = api
        .login("reader@example.com", crate::support::PASSWORD, None)
        .await;
    let schema = introspect(&reader).await;
    let names = |root: &str| -> BTreeSet<String> {
        schema[root]["fields"]
            .as_array()
            .map(|fields| fields.iter().map(|f| text(&f["name"])).collect())
            .unwrap_or_default()
    };
    let queries = names("queryType");
    let mutations = names("mutationType");
    let covered: BTreeSet<String> = CASES.iter().map(|c| operation(c).to_owned()).collect();

    let exempt: BTreeSet<String> = EXEMPT_MUTATIONS.map(String::from).into();
    let missing: Vec<_> = queries
        .iter()
        .chain(mutations.difference(&exempt))
        .filter(|op| !covered.contains(*op))
        .collect();
    assert!(
        missing.is_empty(),
        "operations without a row in the role matrix: {missing:?}"
    );
    let stale: Vec<_> = covered
        .iter()
        .filter(|op| !queries.contains(*op) && !mutations.contains(*op))
        .collect();
    assert!(
        stale.is_empty(),
        "matrix rows for operations the schema does not have: {stale:?}"
    );
    for exempt in EXEMPT_MUTATIONS {
        assert!(mutations.contains(exempt), "{exempt} is still a mutation");
    }
    for (role, cases) in ALLOWED {
        for case in cases {
            assert!(CASES.contains(case), "{role} lists unknown case {case}");
        }
    }
}

/// Tenant A with one member of each role, each logged in to A.
async fn members_of_each_role(world: &World) -> Vec<(&'static str, Gql)> {
    let mut clients = vec![("OWNER", world.a.owner.clone())];
    for role in &ROLES[1..] {
        let email = format!("{}@alpha.example", role.to_lowercase());
        add_member(world, &email, role).await;
        clients.push((
            role,
            world.api.login(&email, PASSWORD, Some(&world.a.id)).await,
        ));
    }
    clients
}

/// Adds a member to A as A's owner; returns the user id.
async fn add_member(world: &World, email: &str, role: &str) -> String {
    let added = world
        .a
        .owner
        .run(
            "mutation($input: AddMemberInput!) { addMember(input: $input) { user { id } } }",
            json!({ "input": { "email": email, "role": role, "password": PASSWORD } }),
        )
        .await;
    text(&added.data()["addMember"]["user"]["id"])
}

/// Creates a task in A's cluster as A's owner; returns its id.
async fn add_task(world: &World, name: &str, paused: bool) -> String {
    let mut input = task_input(&world.a.cluster_id, name);
    input["paused"] = json!(paused);
    let created = world
        .a
        .owner
        .run(CREATE_TASK, json!({ "input": input }))
        .await;
    text(&created.data()["createTask"]["id"])
}

/// Creates an empty cluster in A as A's owner; returns its id.
async fn add_cluster(world: &World, name: &str) -> String {
    let created = world
        .a
        .owner
        .run(
            "mutation($n: String!) { createCluster(name: $n) { cluster { id } } }",
            json!({ "n": name }),
        )
        .await;
    text(&created.data()["createCluster"]["cluster"]["id"])
}

/// One request, ready to send.
struct Call {
    query: &'static str,
    vars: Value,
    /// (variable path, file name, bytes) for a multipart request.
    upload: Option<(&'static str, &'static str, Vec<u8>)>,
}

impl Call {
    fn new(query: &'static str, vars: Value) -> Call {
        Call {
            query,
            vars,
            upload: None,
        }
    }

    fn is_mutation(&self) -> bool {
        self.query.trim_start().starts_with("mutation")
    }
}

/// Prepares fresh objects in A (as A's owner) for one case, so every call stands alone.
/// `tag` keeps names and emails unique per role.
async fn prepare(world: &World, case: &str, tag: &str) -> Call {
    match case {
        "me" => Call::new("{ me { id } }", json!({})),
        "tenant" => Call::new("{ tenant { id } }", json!({})),
        "tenants" => Call::new("{ tenants { id } }", json!({})),
        "clusters" => Call::new("{ clusters { id } }", json!({})),
        "cluster" => Call::new(
            "query($id: ID!) { cluster(id: $id) { id } }",
            json!({ "id": world.a.cluster_id }),
        ),
        "tasks" => Call::new("{ tasks(first: 10) { edges { node { id } } } }", json!({})),
        "task" => Call::new(
            "query($id: ID!) { task(id: $id) { id } }",
            json!({ "id": world.a.task_id }),
        ),
        "runs" => Call::new("{ runs(first: 10) { edges { node { id } } } }", json!({})),
        "run" => Call::new(
            "query($id: ID!) { run(id: $id) { id logs { text } } }",
            json!({ "id": add_run(world, &world.a.cluster_id, &world.a.task_id).await }),
        ),
        "members" => Call::new("{ members { role } }", json!({})),
        "dashboard" => Call::new("{ dashboard { taskCount } }", json!({})),
        "auditLog" => Call::new(
            "{ auditLog(first: 5) { edges { node { id } } } }",
            json!({}),
        ),
        "notificationSettings" => Call::new(
            "{ notificationSettings { notifyEmails webhookUrl } }",
            json!({}),
        ),
        "setNotificationSettings" => Call::new(
            "mutation($input: NotificationSettingsInput!) {
                setNotificationSettings(input: $input) { notifyEmails }
            }",
            json!({ "input": { "notifyEmails": [format!("{tag}@alpha.example")] } }),
        ),
        "retention" => Call::new(
            "{ retention { held { runDays } lastPrune { at } } }",
            json!({}),
        ),
        "setRetention" => Call::new(
            "mutation($input: RetentionInput!) { setRetention(input: $input) { own { runDays } } }",
            // A value of each role's own, so that each call changes something.
            json!({ "input": { "runDays": 1 + ROLES.iter().position(|r| r.to_lowercase() == tag).unwrap_or(9) } }),
        ),
        "createTask" => Call::new(
            CREATE_TASK,
            json!({ "input": task_input(&world.a.cluster_id, &format!("{tag}-created")) }),
        ),
        "createTask(package)" => {
            let mut input = task_input(&world.a.cluster_id, &format!("{tag}-packaged"));
            input["package"] = Value::Null;
            let script = format!("#!/bin/sh\necho {tag}\n");
            Call {
                upload: Some((
                    "variables.input.package",
                    "job.tar.gz",
                    samples::tar_gz_of(&[("run.sh", script.as_bytes(), 0o755)]),
                )),
                ..Call::new(CREATE_TASK, json!({ "input": input }))
            }
        }
        "updateTask" => Call::new(
            "mutation($id: ID!) { updateTask(id: $id, input: { command: \"echo v2\" }) { version } }",
            json!({ "id": add_task(world, &format!("{tag}-update"), false).await }),
        ),
        "cloneTask" => Call::new(
            "mutation($id: ID!, $n: String!) { cloneTask(id: $id, name: $n) { id } }",
            json!({
                "id": add_task(world, &format!("{tag}-clone-source"), false).await,
                "n": format!("{tag}-clone"),
            }),
        ),
        "deleteTask" => Call::new(
            "mutation($id: ID!) { deleteTask(id: $id) }",
            json!({ "id": add_task(world, &format!("{tag}-delete"), false).await }),
        ),
        "uploadPackage" => {
            let code = format!("print('{tag}')\n");
            Call {
                upload: Some((
                    "variables.file",
                    "job.zip",
                    samples::zip_of(&[("main.py", code.as_bytes(), 0o644)]),
                )),
                ..Call::new(
                    "mutation($id: ID!, $file: Upload!) { uploadPackage(taskId: $id, file: $file) { version } }",
                    json!({
                        "id": add_task(world, &format!("{tag}-upload"), false).await,
                        "file": null,
                    }),
                )
            }
        }
        "runTaskNow" => Call::new(
            "mutation($id: ID!) { runTaskNow(id: $id) { status trigger } }",
            json!({ "id": add_task(world, &format!("{tag}-run-now"), false).await }),
        ),
        "stopRun" => {
            // A queued manual run (no worker runs in this test): stopping it ends it.
            let task = add_task(world, &format!("{tag}-stop"), false).await;
            let queued = world
                .a
                .owner
                .run(
                    "mutation($id: ID!) { runTaskNow(id: $id) { id } }",
                    json!({ "id": task }),
                )
                .await;
            Call::new(
                "mutation($id: ID!) { stopRun(id: $id) { status } }",
                json!({ "id": text(&queued.data()["runTaskNow"]["id"]) }),
            )
        }
        "pauseTask" => Call::new(
            "mutation($id: ID!) { pauseTask(id: $id) { state } }",
            json!({ "id": add_task(world, &format!("{tag}-pause"), false).await }),
        ),
        "resumeTask" => Call::new(
            "mutation($id: ID!) { resumeTask(id: $id) { state } }",
            json!({ "id": add_task(world, &format!("{tag}-resume"), true).await }),
        ),
        "createCluster" => Call::new(
            "mutation($n: String!) { createCluster(name: $n) { cluster { id } joinToken } }",
            json!({ "n": format!("{tag}-created") }),
        ),
        "rotateClusterToken" => Call::new(
            "mutation($id: ID!) { rotateClusterToken(id: $id) { joinToken } }",
            json!({ "id": add_cluster(world, &format!("{tag}-rotate")).await }),
        ),
        "setClusterLimits" => Call::new(
            "mutation($id: ID!) { setClusterLimits(id: $id, limits: { memoryMb: 256 }) { id } }",
            json!({ "id": add_cluster(world, &format!("{tag}-limits")).await }),
        ),
        "deleteCluster" => Call::new(
            "mutation($id: ID!) { deleteCluster(id: $id) }",
            json!({ "id": add_cluster(world, &format!("{tag}-delete")).await }),
        ),
        "addMember(VIEWER)" | "addMember(OWNER)" => {
            let role = if case.contains("OWNER") {
                "OWNER"
            } else {
                "VIEWER"
            };
            Call::new(
                "mutation($input: AddMemberInput!) { addMember(input: $input) { role } }",
                json!({ "input": {
                    "email": format!("{tag}-added-{}@alpha.example", role.to_lowercase()),
                    "role": role,
                    "password": PASSWORD,
                } }),
            )
        }
        "setMemberRole(VIEWER->OPERATOR)"
        | "setMemberRole(VIEWER->OWNER)"
        | "setMemberRole(OWNER->VIEWER)" => {
            let (from, to) = case
                .trim_start_matches("setMemberRole(")
                .trim_end_matches(')')
                .split_once("->")
                .unwrap();
            let email = format!(
                "{tag}-{}-to-{}@alpha.example",
                from.to_lowercase(),
                to.to_lowercase()
            );
            Call::new(
                "mutation($id: ID!, $role: Role!) { setMemberRole(userId: $id, role: $role) { role } }",
                json!({ "id": add_member(world, &email, from).await, "role": to }),
            )
        }
        "removeMember(VIEWER)" | "removeMember(OWNER)" => {
            let role = if case.contains("OWNER") {
                "OWNER"
            } else {
                "VIEWER"
            };
            let email = format!("{tag}-removed-{}@alpha.example", role.to_lowercase());
            Call::new(
                "mutation($id: ID!) { removeMember(userId: $id) }",
                json!({ "id": add_member(world, &email, role).await }),
            )
        }
        other => panic!("no preparation for case {other}"),
    }
}

/// A snapshot without its audit log.
fn without_audit_log(snapshot: &Value) -> Value {
    let mut rest = snapshot.clone();
    rest.as_object_mut()
        .expect("a snapshot is an object")
        .remove("auditLog")
        .expect("the snapshot has an audit log");
    rest
}

/// The operations of the audit rows in `after` that `before` did not have.
fn new_audit_operations(before: &Value, after: &Value) -> Vec<String> {
    let rows = |snapshot: &Value| -> Vec<Value> {
        snapshot["auditLog"]["edges"]
            .as_array()
            .expect("audit log edges")
            .iter()
            .map(|edge| edge["node"].clone())
            .collect()
    };
    let seen: BTreeSet<String> = rows(before).iter().map(|row| text(&row["id"])).collect();
    rows(after)
        .iter()
        .filter(|row| !seen.contains(&text(&row["id"])))
        .map(|row| text(&row["operation"]))
        .collect()
}

#[tokio::test]
async fn each_role_may_do_what_the_matrix_allows_and_nothing_else() {
    let world = World::new().await;
    let members = members_of_each_role(&world).await;
    let mut mismatches = Vec::new();

    for (role, client) in &members {
        let tag = role.to_lowercase();
        for case in CASES {
            let call = prepare(&world, case, &tag).await;
            let before = snapshot(&world.a.owner).await;
            let response = match &call.upload {
                None => client.run(call.query, call.vars.clone()).await,
                Some((path, name, bytes)) => {
                    client
                        .upload(
                            call.query,
                            call.vars.clone(),
                            vec![(path, name, bytes.clone())],
                        )
                        .await
                }
            };
            let after = snapshot(&world.a.owner).await;
            let expected = allowed(role, case);
            if expected {
                let answered =
                    response.code().is_none() && !response.body["data"][operation(case)].is_null();
                if !answered {
                    mismatches.push(format!(
                        "{role} {case}: expected success, got {}",
                        response.body
                    ));
                } else if call.is_mutation() {
                    // Every mutation adds an audit row, so the audit log alone would make
                    // any success look like a change: the change must show elsewhere.
                    if without_audit_log(&after) == without_audit_log(&before) {
                        mismatches.push(format!(
                            "{role} {case}: succeeded but changed nothing besides the audit log"
                        ));
                    }
                    let added = new_audit_operations(&before, &after);
                    if !added.iter().any(|op| op == operation(case)) {
                        mismatches.push(format!(
                            "{role} {case}: no audit row for it (new rows: {added:?})"
                        ));
                    }
                } else if after != before {
                    mismatches.push(format!("{role} {case}: a read changed the tenant"));
                }
            } else {
                if response.code() != Some("FORBIDDEN") {
                    mismatches.push(format!(
                        "{role} {case}: expected FORBIDDEN, got {}",
                        response.body
                    ));
                }
                if after != before {
                    mismatches.push(format!(
                        "{role} {case}: refused but changed the tenant:\nbefore {before}\nafter  {after}"
                    ));
                }
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "role matrix mismatches:\n{}",
        mismatches.join("\n")
    );
}

#[tokio::test]
async fn only_platform_admins_create_tenants() {
    let world = World::new().await;
    let members = members_of_each_role(&world).await;
    let tenants = || async {
        world
            .admin
            .run("{ tenants { id name } }", json!({}))
            .await
            .data()["tenants"]
            .clone()
    };
    let create = |client: &Gql, name: String| {
        let client = client.clone();
        async move {
            client
                .run(
                    "mutation($input: CreateTenantInput!) { createTenant(input: $input) { id } }",
                    json!({ "input": {
                        "name": name,
                        "ownerEmail": format!("owner@{name}.example"),
                        "ownerPassword": PASSWORD,
                    } }),
                )
                .await
        }
    };

    for (role, client) in &members {
        let before = tenants().await;
        let refused = create(client, format!("by-{}", role.to_lowercase())).await;
        assert_eq!(
            refused.code(),
            Some("FORBIDDEN"),
            "{role}: {}",
            refused.body
        );
        assert_eq!(tenants().await, before, "{role}'s refused createTenant");
    }

    let before = tenants().await.as_array().unwrap().len();
    let created = create(&world.admin, "by-admin".into()).await;
    assert!(created.data()["createTenant"]["id"].is_string());
    assert_eq!(tenants().await.as_array().unwrap().len(), before + 1);
}

#[tokio::test]
async fn sessions_need_no_role() {
    let world = World::new().await;
    members_of_each_role(&world).await;
    let anonymous = world.api.client();
    for role in ROLES {
        let email = if role == "OWNER" {
            world.a.owner_email.clone()
        } else {
            format!("{}@alpha.example", role.to_lowercase())
        };
        let login = anonymous
            .run(
                "mutation($e: String!, $p: String!, $t: ID) {
                    login(email: $e, password: $p, tenantId: $t) { refreshToken role }
                }",
                json!({ "e": email, "p": PASSWORD, "t": world.a.id }),
            )
            .await;
        assert_eq!(login.data()["login"]["role"], role);
        let refreshed = anonymous
            .run(
                "mutation($r: String!) { refreshToken(refreshToken: $r) { refreshToken role } }",
                json!({ "r": login.data()["login"]["refreshToken"] }),
            )
            .await;
        assert_eq!(refreshed.data()["refreshToken"]["role"], role);
        let logout = anonymous
            .run(
                "mutation($r: String!) { logout(refreshToken: $r) }",
                json!({ "r": refreshed.data()["refreshToken"]["refreshToken"] }),
            )
            .await;
        assert_eq!(logout.data()["logout"], true, "{role} logs out");
    }
}
