//! Bad input gets BAD_USER_INPUT naming the field (or CONFLICT for duplicates), and the
//! catalogue is exactly as it was: tasks and their versions, clusters, members, audit log.

use cloudtask_testkit::{Gql, GqlResponse, TestApi};
use serde_json::{Value, json};

use crate::support::{CREATE_TASK, World, task_input};

/// Everything the owner can see that a refused request must not change.
const SNAPSHOT: &str = "{
    tasks(first: 200) { edges { node {
        id name description version state schedule timezone command timeoutSeconds
        maxRetries activeFrom activeUntil notifyEmails updatedAt
        limits { memoryMb cpuMillis maxProcesses maxOutputBytes }
        env { name value } package { sha256 }
        versions { version spec { schedule timezone command } }
    } } }
    clusters { id name tokenRotatedAt defaultLimits { memoryMb cpuMillis maxProcesses maxOutputBytes } }
    members { role user { id email } }
    auditLog(first: 200) { edges { node { id operation } } }
}";

async fn snapshot(owner: &Gql) -> Value {
    owner.run(SNAPSHOT, json!({})).await.data().clone()
}

fn audit_rows(snapshot: &Value) -> usize {
    snapshot["auditLog"]["edges"].as_array().unwrap().len()
}

/// Runs `refused` and checks the catalogue did not change.
struct Guard<'a> {
    owner: &'a Gql,
    before: Value,
}

impl<'a> Guard<'a> {
    async fn new(owner: &'a Gql) -> Guard<'a> {
        Guard {
            owner,
            before: snapshot(owner).await,
        }
    }

    async fn unchanged(&self, what: &str) {
        let after = snapshot(self.owner).await;
        assert_eq!(
            audit_rows(&after),
            audit_rows(&self.before),
            "{what}: the audit log did not grow"
        );
        assert_eq!(after, self.before, "{what}: the catalogue is unchanged");
    }
}

fn assert_bad_input(response: &GqlResponse, field: &str, what: &str) {
    assert_eq!(
        response.code(),
        Some("BAD_USER_INPUT"),
        "{what}: {}",
        response.body
    );
    assert_eq!(
        response.body["errors"][0]["extensions"]["field"], field,
        "{what}: the field is named: {}",
        response.body
    );
    assert!(
        !response.message().is_empty(),
        "{what}: a message: {}",
        response.body
    );
    assert_no_data(response, what);
}

fn assert_no_data(response: &GqlResponse, what: &str) {
    let data = &response.body["data"];
    assert!(
        data.is_null()
            || data
                .as_object()
                .is_some_and(|d| d.values().all(Value::is_null)),
        "{what}: no data: {}",
        response.body
    );
}

fn assert_code(response: &GqlResponse, code: &str, what: &str) {
    assert_eq!(response.code(), Some(code), "{what}: {}", response.body);
    assert_no_data(response, what);
}

#[tokio::test]
async fn create_task_refuses_each_bad_field_and_changes_nothing() {
    let world = World::new().await;
    let owner = &world.a.owner;
    let guard = Guard::new(owner).await;
    let cluster = &world.a.cluster_id;
    let long_name = "x".repeat(101);
    let long_description = "d".repeat(2_001);

    let cases: Vec<(&str, &str, Value)> = vec![
        ("minute 61", "schedule", json!({ "schedule": "61 * * * *" })),
        (
            "three cron fields",
            "schedule",
            json!({ "schedule": "* * *" }),
        ),
        ("@reboot", "schedule", json!({ "schedule": "@reboot" })),
        ("empty schedule", "schedule", json!({ "schedule": "" })),
        (
            "unknown timezone",
            "timezone",
            json!({ "timezone": "Mars/Olympus_Mons" }),
        ),
        ("empty command", "command", json!({ "command": "" })),
        (
            "a label no worker can carry",
            "labels",
            json!({ "labels": ["gpu:a100"] }),
        ),
        ("an empty label", "labels", json!({ "labels": [""] })),
        ("blank command", "command", json!({ "command": "   " })),
        ("101-char name", "name", json!({ "name": long_name })),
        ("empty name", "name", json!({ "name": "" })),
        (
            "long description",
            "description",
            json!({ "description": long_description }),
        ),
        (
            "env name with a digit first",
            "env",
            json!({ "env": [{ "name": "1BAD", "value": "x" }] }),
        ),
        (
            "env name with a dash",
            "env",
            json!({ "env": [{ "name": "BAD-NAME", "value": "x" }] }),
        ),
        (
            "reserved env name",
            "env",
            json!({ "env": [{ "name": "CLOUDTASK_RUN_ID", "value": "x" }] }),
        ),
        (
            "env name twice",
            "env",
            json!({ "env": [{ "name": "A", "value": "1" }, { "name": "A", "value": "2" }] }),
        ),
        (
            "timeout 0",
            "timeoutSeconds",
            json!({ "timeoutSeconds": 0 }),
        ),
        ("99 retries", "maxRetries", json!({ "maxRetries": 99 })),
        (
            "a 1 MiB memory limit",
            "limits.memoryMb",
            json!({ "limits": { "memoryMb": 1 } }),
        ),
        (
            "a one-process limit",
            "limits.maxProcesses",
            json!({ "limits": { "maxProcesses": 1 } }),
        ),
        (
            "window ends before it starts",
            "activeUntil",
            json!({
                "activeFrom": "2030-01-02T00:00:00Z",
                "activeUntil": "2030-01-01T00:00:00Z",
            }),
        ),
        (
            "bad notify email",
            "notifyEmails",
            json!({ "notifyEmails": ["not-an-email"] }),
        ),
        (
            "package hash not hex",
            "package",
            json!({ "packageSha256": "zz" }),
        ),
        (
            "malformed cluster id",
            "clusterId",
            json!({ "clusterId": "nope" }),
        ),
    ];
    for (what, field, overrides) in cases {
        let mut input = task_input(cluster, "fresh");
        for (key, value) in overrides.as_object().unwrap() {
            input[key] = value.clone();
        }
        let response = owner.run(CREATE_TASK, json!({ "input": input })).await;
        assert_bad_input(&response, field, what);
    }
    guard.unchanged("createTask with bad fields").await;
}

#[tokio::test]
async fn queries_refuse_malformed_ids_cursors_and_page_sizes() {
    let world = World::new().await;
    let owner = &world.a.owner;
    let guard = Guard::new(owner).await;
    let task_query = "query($id: ID!) { task(id: $id) { id } }";
    let cases: Vec<(&str, &str, &str, Value)> = vec![
        ("task(id: nope)", "id", task_query, json!({ "id": "nope" })),
        ("task(id: empty)", "id", task_query, json!({ "id": "" })),
        (
            "cluster(id: nope)",
            "id",
            "query($id: ID!) { cluster(id: $id) { id } }",
            json!({ "id": "nope" }),
        ),
        (
            "garbage cursor",
            "after",
            "query($a: String) { tasks(after: $a) { edges { node { id } } } }",
            json!({ "a": "garbage" }),
        ),
        (
            "a task id as cursor",
            "after",
            "query($a: String) { tasks(after: $a) { edges { node { id } } } }",
            json!({ "a": world.a.task_id }),
        ),
        (
            "first: -1",
            "first",
            "query($f: Int) { tasks(first: $f) { edges { node { id } } } }",
            json!({ "f": -1 }),
        ),
        (
            "first: 1000",
            "first",
            "query($f: Int) { tasks(first: $f) { edges { node { id } } } }",
            json!({ "f": 1000 }),
        ),
        (
            "auditLog first: 1000",
            "first",
            "query($f: Int) { auditLog(first: $f) { edges { node { id } } } }",
            json!({ "f": 1000 }),
        ),
        (
            "filter.clusterId: nope",
            "filter.clusterId",
            "query($c: ID) { tasks(filter: { clusterId: $c }) { edges { node { id } } } }",
            json!({ "c": "nope" }),
        ),
        (
            "nextFireTimes(count: 101)",
            "count",
            "query($id: ID!) { task(id: $id) { nextFireTimes(count: 101) } }",
            json!({ "id": world.a.task_id }),
        ),
    ];
    for (what, field, query, variables) in cases {
        let response = owner.run(query, variables).await;
        assert_bad_input(&response, field, what);
    }
    let bad_ids: Vec<(&str, &str, &str)> = vec![
        (
            "updateTask",
            "id",
            "mutation($id: ID!) { updateTask(id: $id, input: { command: \"x\" }) { id } }",
        ),
        (
            "pauseTask",
            "id",
            "mutation($id: ID!) { pauseTask(id: $id) { id } }",
        ),
        (
            "deleteTask",
            "id",
            "mutation($id: ID!) { deleteTask(id: $id) }",
        ),
        (
            "cloneTask",
            "id",
            "mutation($id: ID!) { cloneTask(id: $id, name: \"c\") { id } }",
        ),
        (
            "deleteCluster",
            "id",
            "mutation($id: ID!) { deleteCluster(id: $id) }",
        ),
        (
            "rotateClusterToken",
            "id",
            "mutation($id: ID!) { rotateClusterToken(id: $id) { joinToken } }",
        ),
        (
            "removeMember",
            "userId",
            "mutation($id: ID!) { removeMember(userId: $id) }",
        ),
    ];
    for (what, field, query) in bad_ids {
        let response = owner.run(query, json!({ "id": "nope" })).await;
        assert_bad_input(&response, field, &format!("{what}(nope)"));
    }
    guard
        .unchanged("malformed ids, cursors and page sizes")
        .await;
}

#[tokio::test]
async fn update_task_with_bad_fields_keeps_the_task_as_it_was() {
    let world = World::new().await;
    let owner = &world.a.owner;
    let task_id = &world.a.task_id;
    let guard = Guard::new(owner).await;
    let update = "mutation($id: ID!, $input: UpdateTaskInput!) {
        updateTask(id: $id, input: $input) { id version schedule }
    }";
    let cases: Vec<(&str, &str, Value)> = vec![
        ("minute 61", "schedule", json!({ "schedule": "61 * * * *" })),
        ("@reboot", "schedule", json!({ "schedule": "@reboot" })),
        (
            "unknown timezone",
            "timezone",
            json!({ "timezone": "Europe/Atlantis" }),
        ),
        (
            "bad schedule with a good command",
            "schedule",
            json!({ "schedule": "* * *", "command": "echo changed" }),
        ),
        ("empty command", "command", json!({ "command": "" })),
        ("101-char name", "name", json!({ "name": "y".repeat(101) })),
        (
            "timeout 0",
            "timeoutSeconds",
            json!({ "timeoutSeconds": 0 }),
        ),
        ("99 retries", "maxRetries", json!({ "maxRetries": 99 })),
        (
            "a 1 MiB memory limit",
            "limits.memoryMb",
            json!({ "limits": { "memoryMb": 1 } }),
        ),
        (
            "a one-process limit",
            "limits.maxProcesses",
            json!({ "limits": { "maxProcesses": 1 } }),
        ),
        (
            "window ends before it starts",
            "activeUntil",
            json!({
                "activeFrom": "2030-01-02T00:00:00Z",
                "activeUntil": "2030-01-01T00:00:00Z",
            }),
        ),
        (
            "bad env name",
            "env",
            json!({ "env": [{ "name": "NO SPACES", "value": "x" }] }),
        ),
    ];
    for (what, field, input) in cases {
        let response = owner
            .run(update, json!({ "id": task_id, "input": input }))
            .await;
        assert_bad_input(&response, field, what);
    }
    let task = owner
        .run(
            "query($id: ID!) { task(id: $id) { version schedule timezone command } }",
            json!({ "id": task_id }),
        )
        .await;
    let task = &task.data()["task"];
    assert_eq!(task["version"], 1);
    assert_eq!(task["schedule"], "*/5 * * * *");
    assert_eq!(task["timezone"], "UTC");
    assert_eq!(task["command"], "echo hello");
    guard.unchanged("updateTask with bad fields").await;
}

#[tokio::test]
async fn clusters_refuse_bad_names_duplicates_and_deletion_with_tasks() {
    let world = World::new().await;
    let owner = &world.a.owner;
    let guard = Guard::new(owner).await;
    let create = "mutation($n: String!) { createCluster(name: $n) { cluster { id } joinToken } }";
    for (what, name) in [
        ("empty", String::new()),
        ("blank", "   ".to_owned()),
        ("101 chars", "c".repeat(101)),
        ("control character", "bad\u{7}name".to_owned()),
    ] {
        let response = owner.run(create, json!({ "n": name })).await;
        assert_bad_input(&response, "name", &format!("createCluster {what}"));
    }

    let duplicate = owner.run(create, json!({ "n": "alpha-cluster" })).await;
    assert_code(&duplicate, "CONFLICT", "same cluster name twice");

    let delete = owner
        .run(
            "mutation($id: ID!) { deleteCluster(id: $id) }",
            json!({ "id": world.a.cluster_id }),
        )
        .await;
    assert_code(&delete, "CONFLICT", "deleteCluster with a task");
    let limits = owner
        .run(
            "mutation($id: ID!) { setClusterLimits(id: $id, limits: { cpuMillis: 1 }) { id } }",
            json!({ "id": world.a.cluster_id }),
        )
        .await;
    assert_bad_input(
        &limits,
        "limits.cpuMillis",
        "setClusterLimits below 10 millis",
    );
    guard.unchanged("bad cluster mutations").await;

    // Another tenant may use the same cluster name: names are unique per tenant only.
    let other = world
        .b
        .owner
        .run(create, json!({ "n": "alpha-cluster" }))
        .await;
    assert!(other.data()["createCluster"]["cluster"]["id"].is_string());
    guard.unchanged("tenant B's cluster").await;
}

#[tokio::test]
async fn duplicate_task_names_conflict_and_change_nothing() {
    let world = World::new().await;
    let owner = &world.a.owner;
    let guard = Guard::new(owner).await;
    let duplicate = owner
        .run(
            CREATE_TASK,
            json!({ "input": task_input(&world.a.cluster_id, "alpha-task") }),
        )
        .await;
    assert_code(&duplicate, "CONFLICT", "same task name twice");
    let clone = owner
        .run(
            "mutation($id: ID!) { cloneTask(id: $id, name: \"alpha-task\") { id } }",
            json!({ "id": world.a.task_id }),
        )
        .await;
    assert_code(&clone, "CONFLICT", "clone under an existing name");
    guard.unchanged("duplicate task names").await;
}

/// A query nesting `levels` task → cluster → tasks hops (one task a page, so that it is
/// deep without being costly).
fn deep_query(levels: usize) -> String {
    let mut query = String::from("id");
    for _ in 0..levels {
        query = format!("tasks(first: 1) {{ edges {{ node {{ cluster {{ {query} }} }} }} }}");
    }
    format!("{{ {query} }}")
}

#[tokio::test]
async fn queries_over_the_depth_or_complexity_limit_are_refused() {
    let api = TestApi::start_with(|config| {
        config.query_max_depth = 5;
        config.query_max_complexity = 50;
    })
    .await;
    let client = api.client();

    // Control: a shallow query gets as far as authentication.
    let shallow = client.run("{ me { id } }", json!({})).await;
    assert_eq!(shallow.code(), Some("UNAUTHENTICATED"), "{}", shallow.body);

    let deep = client.run(&deep_query(2), json!({})).await;
    assert!(deep.body["errors"][0].is_object(), "refused: {}", deep.body);
    assert!(
        deep.message().contains("nested too deep"),
        "the depth limit refused it: {}",
        deep.body
    );
    assert_no_data(&deep, "deep query");
    // async-graphql's own validation errors carry no `extensions.code`; the HTTP layer
    // (api/src/http.rs) gives them BAD_USER_INPUT, as DESIGN §8 requires a code on every
    // error.
    assert_eq!(deep.code(), Some("BAD_USER_INPUT"), "{}", deep.body);

    let fields = (0..40)
        .map(|i| format!("a{i}: me {{ id }}"))
        .collect::<Vec<_>>()
        .join(" ");
    let wide = client.run(&format!("{{ {fields} }}"), json!({})).await;
    assert!(
        wide.message().contains("too complex"),
        "the complexity limit refused it: {}",
        wide.body
    );
    assert_no_data(&wide, "complex query");
    assert_eq!(wide.code(), Some("BAD_USER_INPUT"), "{}", wide.body);
}

#[tokio::test]
async fn a_request_body_over_the_limit_is_refused_with_413() {
    let api = TestApi::start_with(|config| config.max_request_bytes = 2048).await;
    let padding = "#".repeat(4_096);
    let big = api
        .client()
        .run(&format!("{{ me {{ id }} }}\n{padding}\n"), json!({}))
        .await;
    assert_eq!(big.status, 413, "{}", big.body);
    assert_eq!(big.code(), Some("BAD_USER_INPUT"), "{}", big.body);
    assert!(!big.message().is_empty(), "{}", big.body);

    // Control: the same query without padding gets through to authentication.
    let small = api.client().run("{ me { id } }", json!({})).await;
    assert_eq!(small.status, 200);
    assert_eq!(small.code(), Some("UNAUTHENTICATED"), "{}", small.body);
}

#[tokio::test]
async fn values_of_the_wrong_type_are_bad_user_input() {
    let world = World::new().await;
    let owner = &world.a.owner;
    let guard = Guard::new(owner).await;
    // (field, overrides, whether `extensions.field` names it). A value of the wrong type
    // for its GraphQL type is refused by async-graphql's validation, and the HTTP layer
    // (`give_codes` in api/src/http.rs) names the field from the argument path in the
    // message. An Int out of the Rust type's range (u32) or an unparsable DateTime passes
    // validation and fails while the resolver parses `CreateTaskInput`; that message
    // ("Failed to parse \"Int\": Invalid number (occurred while parsing
    // \"CreateTaskInput\")") names no field, so nothing can name it there. Naming those
    // needs the input type itself to report the field (api/src/graphql/mutation.rs).
    let cases: Vec<(&str, Value, bool)> = vec![
        ("timeoutSeconds", json!({ "timeoutSeconds": -1 }), false),
        ("maxRetries", json!({ "maxRetries": "x" }), true),
        (
            "overlapPolicy",
            json!({ "overlapPolicy": "SOMETIMES" }),
            true,
        ),
        ("schedule", json!({ "schedule": null }), true),
        ("activeFrom", json!({ "activeFrom": "yesterday" }), false),
    ];
    for (field, overrides, named) in cases {
        let mut input = task_input(&world.a.cluster_id, "fresh");
        for (key, value) in overrides.as_object().unwrap() {
            input[key] = value.clone();
        }
        let response = owner.run(CREATE_TASK, json!({ "input": input })).await;
        assert_code(&response, "BAD_USER_INPUT", field);
        let given = &response.body["errors"][0]["extensions"]["field"];
        if named {
            assert_eq!(given, field, "the field is named: {}", response.body);
        } else {
            assert!(
                given.is_null() || given == field,
                "never a wrong field: {}",
                response.body
            );
        }
    }
    // A required input field left out, and a list entry of the wrong type: the input
    // field, and the list by its own name (as resolver errors name `env`).
    let mut missing = task_input(&world.a.cluster_id, "fresh");
    missing.as_object_mut().unwrap().remove("schedule");
    let mut bad_entry = task_input(&world.a.cluster_id, "fresh");
    bad_entry["env"] = json!([{ "name": 1, "value": "x" }]);
    for (what, field, input) in [
        ("schedule left out", "schedule", missing),
        ("env entry of the wrong type", "env", bad_entry),
    ] {
        let response = owner.run(CREATE_TASK, json!({ "input": input })).await;
        assert_code(&response, "BAD_USER_INPUT", what);
        assert_eq!(
            response.body["errors"][0]["extensions"]["field"], field,
            "{what}: the field is named: {}",
            response.body
        );
    }
    let unknown_field = owner
        .run("{ tasks(first: 10) { edges { node { idd } } } }", json!({}))
        .await;
    assert_code(&unknown_field, "BAD_USER_INPUT", "unknown field");
    let syntax = owner.run("{ tasks(first: ", json!({})).await;
    assert_code(&syntax, "BAD_USER_INPUT", "syntax error");
    guard.unchanged("values of the wrong type").await;
}

/// Every GraphQL request has an id: in the answer's `X-Request-Id` and in each error's
/// `extensions.requestId`; a caller's plain id is kept, anything else replaced.
#[tokio::test]
async fn every_request_has_an_id_in_its_answer_and_its_errors() {
    let api = TestApi::start().await;
    let client = reqwest::Client::new();
    let ask = |id: Option<&str>| {
        let mut request = client
            .post(format!("{}/graphql", api.url))
            .json(&json!({ "query": "{ me { id } }" }));
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        request.send()
    };
    for (given, kept) in [
        (None, false),
        (Some("trace-42.a_b:c"), true),
        (Some("x".repeat(65).as_str()), false),
        (Some("two words"), false),
        (Some("'; DROP TABLE runs; --"), false),
    ] {
        let answer = ask(given).await.unwrap();
        let id = answer
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no X-Request-Id for {given:?}"));
        let body: Value = answer.json().await.unwrap();
        let error = &body["errors"][0];
        assert_eq!(error["extensions"]["code"], "UNAUTHENTICATED", "{body}");
        assert_eq!(error["extensions"]["requestId"], id.as_str(), "{body}");
        if kept {
            assert_eq!(Some(id.as_str()), given);
        } else {
            assert!(id.starts_with("req_"), "{id} for {given:?}");
        }
    }
}
