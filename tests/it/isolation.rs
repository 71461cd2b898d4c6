//! Tenant isolation: tenant B's owner presents tenant A's ids to every query and mutation
//! that takes one, and gets NOT_FOUND (the same answer as for an id that exists nowhere),
//! while neither tenant's state changes. The operations come from the live schema, so an
//! operation added without a case here makes the test fail.

use std::collections::BTreeSet;

use cloudtask_core::archive::samples;
use cloudtask_testkit::{Gql, GqlResponse};
use serde_json::{Value, json};

use crate::support::{CREATE_TASK, PASSWORD, World, add_run, task_input};

/// Everything a tenant's owner can read about the tenant, for before/after comparisons.
const SNAPSHOT: &str = "{
    tasks(first: 200) { edges { node {
        id name description state version schedule command updatedAt
        cluster { id } package { sha256 }
        versions { version spec { schedule command packageSha256 } }
    } } }
    clusters { id name createdAt tokenRotatedAt
        defaultLimits { memoryMb cpuMillis maxProcesses maxOutputBytes } }
    members { role createdAt user { id email } }
    dashboard { clusterCount taskCount activeTaskCount pausedTaskCount memberCount }
    auditLog(first: 200) { edges { node { id operation objectType objectId } } }
    runs(first: 200) { edges { node { id status finishedAt logs(limit: 1000) { offset text } } } }
    notificationSettings { notifyEmails webhookUrl }
    retention { own { runDays runsPerTask logDays auditDays } }
}";

/// The tenant's state as its owner sees it.
pub(crate) async fn snapshot(owner: &Gql) -> Value {
    owner.run(SNAPSHOT, json!({})).await.data().clone()
}

/// The root fields with their arguments, and every input object with its fields.
pub(crate) const INTROSPECTION: &str = "{ __schema {
    queryType { fields { name args { name type { ...Ref } } } }
    mutationType { fields { name args { name type { ...Ref } } } }
    types { kind name inputFields { name type { ...Ref } } }
}}
fragment Ref on __Type { kind name ofType { kind name ofType { kind name ofType { kind name } } } }";

pub(crate) async fn introspect(client: &Gql) -> Value {
    client.run(INTROSPECTION, json!({})).await.data()["__schema"].clone()
}

/// The named type under any NON_NULL and LIST wrappers: (kind, name).
fn named(mut ty: &Value) -> (&str, &str) {
    while ty["name"].is_null() && !ty["ofType"].is_null() {
        ty = &ty["ofType"];
    }
    (
        ty["kind"].as_str().unwrap_or_default(),
        ty["name"].as_str().unwrap_or_default(),
    )
}

/// Whether a value of this name and type refers to a stored object: an `ID`, or a
/// package hash (packages are tenant-scoped and addressed by sha256).
fn is_reference(name: &str, kind: &str, type_name: &str) -> bool {
    type_name == "ID" || (kind == "SCALAR" && name.to_ascii_lowercase().ends_with("sha256"))
}

/// Argument paths (`input.clusterId`) that carry a reference, through input objects.
fn reference_paths(
    schema: &Value,
    prefix: &str,
    fields: &[Value],
    seen: &mut Vec<String>,
    out: &mut Vec<String>,
) {
    for field in fields {
        let name = field["name"].as_str().unwrap();
        let path = if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}.{name}")
        };
        let (kind, type_name) = named(&field["type"]);
        if is_reference(name, kind, type_name) {
            out.push(path);
        } else if kind == "INPUT_OBJECT" && !seen.iter().any(|s| s == type_name) {
            seen.push(type_name.to_owned());
            let input = schema["types"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == type_name)
                .unwrap_or_else(|| panic!("input type {type_name} in the schema"));
            reference_paths(
                schema,
                &path,
                input["inputFields"].as_array().unwrap(),
                seen,
                out,
            );
            seen.pop();
        }
    }
}

/// `operation(argument.path)` for every Query and Mutation field argument that refers
/// to a stored object.
fn operations_taking_ids(schema: &Value) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for root in ["queryType", "mutationType"] {
        let Some(fields) = schema[root]["fields"].as_array() else {
            continue;
        };
        for field in fields {
            let mut paths = Vec::new();
            reference_paths(
                schema,
                "",
                field["args"].as_array().unwrap(),
                &mut Vec::new(),
                &mut paths,
            );
            for path in paths {
                found.insert(format!("{}({path})", field["name"].as_str().unwrap()));
            }
        }
    }
    found
}

/// What B must get back for A's id.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// An error with this `extensions.code`.
    Code(&'static str),
    /// Success, with an empty `tasks` connection: a filter naming A's object sees nothing.
    NoTasks,
    /// Success, with an empty `runs` connection.
    NoRuns,
}

/// One operation called by B's owner with one of A's references.
struct Case {
    /// `operation(argument.path)`, as [`operations_taking_ids`] names it.
    key: &'static str,
    query: &'static str,
    /// The variables, given the reference to try.
    vars: Box<dyn Fn(&str) -> Value>,
    /// A's references to try, one call each.
    foreign: Vec<String>,
    /// A reference of the same kind that exists in no tenant: B must not be able to tell
    /// the two apart.
    unknown: String,
    /// A file sent with a multipart request: (variable path, file name, bytes).
    upload: Option<(&'static str, &'static str, Vec<u8>)>,
    expect: Expect,
}

impl Case {
    fn new(
        key: &'static str,
        query: &'static str,
        foreign: &[&String],
        vars: impl Fn(&str) -> Value + 'static,
    ) -> Case {
        Case {
            key,
            query,
            vars: Box::new(vars),
            unknown: unknown_like(foreign[0]),
            foreign: foreign.iter().map(|s| (*s).clone()).collect(),
            upload: None,
            expect: Expect::Code("NOT_FOUND"),
        }
    }

    fn upload(mut self, path: &'static str, name: &'static str, bytes: Vec<u8>) -> Case {
        self.upload = Some((path, name, bytes));
        self
    }

    fn expect(mut self, expect: Expect) -> Case {
        self.expect = expect;
        self
    }

    async fn call(&self, client: &Gql, reference: &str) -> GqlResponse {
        let vars = (self.vars)(reference);
        match &self.upload {
            None => client.run(self.query, vars).await,
            Some((path, name, bytes)) => {
                client
                    .upload(self.query, vars, vec![(path, name, bytes.clone())])
                    .await
            }
        }
    }
}

/// The same kind of reference, pointing nowhere: `task_<uuid>` → `task_<new uuid>`, a
/// sha256 → another sha256.
fn unknown_like(reference: &str) -> String {
    let fresh = uuid::Uuid::new_v4().simple().to_string();
    match reference.rsplit_once('_') {
        Some((prefix, _)) => format!("{prefix}_{fresh}"),
        None if reference.len() == 64 => format!("{fresh}{fresh}"),
        None => panic!("no unknown form for {reference:?}"),
    }
}

/// Tenant A's objects, beyond the shared world's.
struct Alpha {
    owner_user_id: String,
    viewer_user_id: String,
    paused_task_id: String,
    empty_cluster_id: String,
    package_sha: String,
    run_id: String,
}

async fn populate_alpha(world: &World) -> Alpha {
    let owner = &world.a.owner;
    let me = owner.run("{ me { id } }", json!({})).await;
    let owner_user_id = me.data()["me"]["id"].as_str().unwrap().to_owned();
    let viewer = owner
        .run(
            "mutation($input: AddMemberInput!) { addMember(input: $input) { user { id } } }",
            json!({ "input": { "email": "viewer@alpha.example", "role": "VIEWER", "password": PASSWORD } }),
        )
        .await;
    let viewer_user_id = viewer.data()["addMember"]["user"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut paused = task_input(&world.a.cluster_id, "alpha-paused");
    paused["paused"] = json!(true);
    let paused = owner.run(CREATE_TASK, json!({ "input": paused })).await;
    let paused_task_id = paused.data()["createTask"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let empty = owner
        .run(
            "mutation { createCluster(name: \"alpha-empty\") { cluster { id } } }",
            json!({}),
        )
        .await;
    let empty_cluster_id = empty.data()["createCluster"]["cluster"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let archive = samples::tar_gz_of(&[("run.sh", b"#!/bin/sh\necho alpha\n", 0o755)]);
    let mut input = task_input(&world.a.cluster_id, "alpha-packaged");
    input["package"] = Value::Null;
    let packaged = owner
        .upload(
            CREATE_TASK,
            json!({ "input": input }),
            vec![("variables.input.package", "job.tar.gz", archive)],
        )
        .await;
    let package_sha = packaged.data()["createTask"]["package"]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let run_id = add_run(world, &world.a.cluster_id, &world.a.task_id).await;
    Alpha {
        owner_user_id,
        viewer_user_id,
        paused_task_id,
        empty_cluster_id,
        package_sha,
        run_id,
    }
}

/// Every reference-taking operation, with A's references to try. B's own task and
/// cluster appear where an operation needs one to reach the reference under test.
fn cases(world: &World, alpha: &Alpha) -> Vec<Case> {
    let a = &world.a;
    let b_task = world.b.task_id.clone();
    let b_cluster = world.b.cluster_id.clone();
    let b_email = world.b.owner_email.clone();
    let tasks = [&a.task_id, &alpha.paused_task_id];
    let clusters = [&a.cluster_id, &alpha.empty_cluster_id];
    let users = [&alpha.owner_user_id, &alpha.viewer_user_id];
    let sha = [&alpha.package_sha];
    let zip = || samples::zip_of(&[("main.py", b"print('from beta')\n", 0o644)]);
    vec![
        // ---- queries ----
        Case::new(
            "cluster(id)",
            "query($id: ID!) { cluster(id: $id) { id name } }",
            &clusters,
            |id| json!({ "id": id }),
        ),
        Case::new(
            "task(id)",
            "query($id: ID!) { task(id: $id) { id name } }",
            &tasks,
            |id| json!({ "id": id }),
        ),
        Case::new(
            "tasks(filter.clusterId)",
            "query($id: ID!) { tasks(first: 50, filter: { clusterId: $id }) { edges { node { id } } } }",
            &clusters,
            |id| json!({ "id": id }),
        )
        .expect(Expect::NoTasks),
        Case::new(
            "run(id)",
            "query($id: ID!) { run(id: $id) { id status } }",
            &[&alpha.run_id],
            |id| json!({ "id": id }),
        ),
        Case::new(
            "runs(filter.taskId)",
            "query($id: ID!) { runs(first: 50, filter: { taskId: $id }) { edges { node { id } } } }",
            &tasks,
            |id| json!({ "id": id }),
        )
        .expect(Expect::NoRuns),
        // ---- mutations ----
        // Choosing a tenant at login is refused as for a tenant that does not exist;
        // the resolver answers FORBIDDEN ("not a member of this tenant") for both.
        Case::new(
            "login(tenantId)",
            "mutation($e: String!, $p: String!, $t: ID) {
                login(email: $e, password: $p, tenantId: $t) { accessToken }
            }",
            &[&a.id],
            move |id| json!({ "e": b_email, "p": PASSWORD, "t": id }),
        )
        .expect(Expect::Code("FORBIDDEN")),
        Case::new(
            "setMemberRole(userId)",
            "mutation($id: ID!) { setMemberRole(userId: $id, role: OPERATOR) { role } }",
            &users,
            |id| json!({ "id": id }),
        ),
        Case::new(
            "removeMember(userId)",
            "mutation($id: ID!) { removeMember(userId: $id) }",
            &users,
            |id| json!({ "id": id }),
        ),
        Case::new(
            "rotateClusterToken(id)",
            "mutation($id: ID!) { rotateClusterToken(id: $id) { joinToken } }",
            &clusters,
            |id| json!({ "id": id }),
        ),
        Case::new(
            "setClusterLimits(id)",
            "mutation($id: ID!) { setClusterLimits(id: $id, limits: { memoryMb: 256 }) { id } }",
            &clusters,
            |id| json!({ "id": id }),
        ),
        Case::new(
            "deleteCluster(id)",
            "mutation($id: ID!) { deleteCluster(id: $id) }",
            &clusters,
            |id| json!({ "id": id }),
        ),
        Case::new(
            "createTask(input.clusterId)",
            CREATE_TASK,
            &clusters,
            |id| json!({ "input": task_input(id, "beta-in-alpha") }),
        ),
        // The same with a package: refused, and the upload is not kept.
        Case::new(
            "createTask(input.clusterId)",
            CREATE_TASK,
            &clusters,
            |id| {
                let mut input = task_input(id, "beta-packaged-in-alpha");
                input["package"] = Value::Null;
                json!({ "input": input })
            },
        )
        .upload("variables.input.package", "job.zip", zip()),
        // A's package hash in B's own task: refused as a hash no tenant holds, which the
        // resolver reports as bad input on `package`.
        Case::new(
            "createTask(input.packageSha256)",
            CREATE_TASK,
            &sha,
            move |sha| {
                let mut input = task_input(&b_cluster, "beta-with-alpha-package");
                input["packageSha256"] = json!(sha);
                json!({ "input": input })
            },
        )
        .expect(Expect::Code("BAD_USER_INPUT")),
        Case::new(
            "updateTask(id)",
            "mutation($id: ID!) { updateTask(id: $id, input: { name: \"stolen\", command: \"echo pwned\" }) { id version } }",
            &tasks,
            |id| json!({ "id": id }),
        ),
        Case::new(
            "updateTask(input.packageSha256)",
            "mutation($id: ID!, $sha: String!) { updateTask(id: $id, input: { packageSha256: $sha }) { id version } }",
            &sha,
            move |sha| json!({ "id": b_task, "sha": sha }),
        )
        .expect(Expect::Code("BAD_USER_INPUT")),
        Case::new(
            "uploadPackage(taskId)",
            "mutation($id: ID!, $file: Upload!) { uploadPackage(taskId: $id, file: $file) { id version } }",
            &tasks,
            |id| json!({ "id": id, "file": null }),
        )
        .upload("variables.file", "job.zip", zip()),
        Case::new(
            "runTaskNow(id)",
            "mutation($id: ID!) { runTaskNow(id: $id) { id status } }",
            &tasks,
            |id| json!({ "id": id }),
        ),
        Case::new(
            "stopRun(id)",
            "mutation($id: ID!) { stopRun(id: $id) { id status } }",
            &[&alpha.run_id],
            |id| json!({ "id": id }),
        ),
        Case::new(
            "pauseTask(id)",
            "mutation($id: ID!) { pauseTask(id: $id) { id state } }",
            &tasks,
            |id| json!({ "id": id }),
        ),
        Case::new(
            "resumeTask(id)",
            "mutation($id: ID!) { resumeTask(id: $id) { id state } }",
            &tasks,
            |id| json!({ "id": id }),
        ),
        Case::new(
            "cloneTask(id)",
            "mutation($id: ID!) { cloneTask(id: $id, name: \"beta-copy\") { id } }",
            &tasks,
            |id| json!({ "id": id }),
        ),
        Case::new(
            "deleteTask(id)",
            "mutation($id: ID!) { deleteTask(id: $id) }",
            &tasks,
            |id| json!({ "id": id }),
        ),
    ]
}

fn check(case: &Case, reference: &str, response: &GqlResponse) {
    match case.expect {
        Expect::Code(code) => assert_eq!(
            response.code(),
            Some(code),
            "{} with {reference}: {}",
            case.key,
            response.body
        ),
        Expect::NoTasks => assert_eq!(
            response.data()["tasks"]["edges"],
            json!([]),
            "{} with {reference} lists tasks",
            case.key
        ),
        Expect::NoRuns => assert_eq!(
            response.data()["runs"]["edges"],
            json!([]),
            "{} with {reference} lists runs",
            case.key
        ),
    }
}

#[tokio::test]
async fn every_operation_taking_an_id_refuses_another_tenants_id() {
    let world = World::new().await;
    let alpha = populate_alpha(&world).await;
    let beta = &world.b.owner;
    let cases = cases(&world, &alpha);

    // The schema's reference-taking operations and the table must match exactly.
    let schema = introspect(beta).await;
    let operations = operations_taking_ids(&schema);
    let covered: BTreeSet<String> = cases.iter().map(|c| c.key.to_owned()).collect();
    let missing: Vec<_> = operations.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "operations taking an id without an isolation case: {missing:?}"
    );
    let stale: Vec<_> = covered.difference(&operations).collect();
    assert!(
        stale.is_empty(),
        "isolation cases for operations the schema does not have: {stale:?}"
    );

    // A's objects are real: A's owner sees every one of them.
    let a_before = snapshot(&world.a.owner).await;
    let a_text = a_before.to_string();
    for id in [
        &world.a.task_id,
        &alpha.paused_task_id,
        &world.a.cluster_id,
        &alpha.empty_cluster_id,
        &alpha.owner_user_id,
        &alpha.viewer_user_id,
        &alpha.package_sha,
        &alpha.run_id,
    ] {
        assert!(a_text.contains(id.as_str()), "{id} in A's snapshot");
    }

    for case in &cases {
        for reference in &case.foreign {
            let a_before = snapshot(&world.a.owner).await;
            let b_before = snapshot(beta).await;
            let response = case.call(beta, reference).await;
            check(case, reference, &response);
            assert_eq!(
                snapshot(&world.a.owner).await,
                a_before,
                "{} with {reference} changed tenant A",
                case.key
            );
            assert_eq!(
                snapshot(beta).await,
                b_before,
                "{} with {reference} changed tenant B",
                case.key
            );

            // Indistinguishable from an id that exists nowhere: same code, same message.
            let unknown = case.call(beta, &case.unknown).await;
            check(case, &case.unknown, &unknown);
            assert_eq!(
                (unknown.code(), unknown.message()),
                (response.code(), response.message()),
                "{}: A's {reference} answers differently from an unknown id",
                case.key
            );
            assert_eq!(snapshot(&world.a.owner).await, a_before);
            assert_eq!(snapshot(beta).await, b_before);
        }
    }

    // A's join token still works after B's rotateClusterToken attempts.
    let join = beta
        .http
        .post(format!("{}/worker/join", world.api.url))
        .json(&json!({ "token": world.a.join_token }))
        .send()
        .await
        .unwrap();
    assert_eq!(join.status(), 200, "A's join token survives");
}

async fn get(client: &Gql, url: String, bearer: &str) -> u16 {
    client
        .http
        .get(url)
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn worker_credential(world: &World, join_token: &str) -> String {
    let join = world
        .a
        .owner
        .http
        .post(format!("{}/worker/join", world.api.url))
        .json(&json!({ "token": join_token }))
        .send()
        .await
        .unwrap();
    assert_eq!(join.status(), 200);
    join.json::<Value>().await.unwrap()["credential"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn package_downloads_stay_within_the_tenant_and_cluster() {
    let world = World::new().await;
    let alpha = populate_alpha(&world).await;
    let sha = &alpha.package_sha;
    let url = &world.api.url;
    let a_token = world.a.owner.token.as_deref().unwrap();
    let b_token = world.b.owner.token.as_deref().unwrap();

    // Users: A's owner downloads A's package; B's owner gets 404, as for an unknown hash.
    let user_url = |sha: &str| format!("{url}/packages/{sha}");
    assert_eq!(get(&world.a.owner, user_url(sha), a_token).await, 200);
    assert_eq!(get(&world.b.owner, user_url(sha), b_token).await, 404);
    assert_eq!(
        get(&world.b.owner, user_url(&unknown_like(sha)), b_token).await,
        404
    );

    // Workers: A's worker downloads it; a worker of B's cluster gets 404.
    let worker_url = |sha: &str| format!("{url}/worker/packages/{sha}");
    let a_worker = worker_credential(&world, &world.a.join_token).await;
    let b_worker = worker_credential(&world, &world.b.join_token).await;
    assert_eq!(get(&world.a.owner, worker_url(sha), &a_worker).await, 200);
    assert_eq!(get(&world.b.owner, worker_url(sha), &b_worker).await, 404);
    assert_eq!(
        get(&world.b.owner, worker_url(&unknown_like(sha)), &b_worker).await,
        404
    );

    // B's worker is not refused across the board: it downloads B's own package.
    let uploaded = world
        .b
        .owner
        .upload(
            "mutation($id: ID!, $file: Upload!) { uploadPackage(taskId: $id, file: $file) { package { sha256 } } }",
            json!({ "id": world.b.task_id, "file": null }),
            vec![("variables.file", "job.zip", samples::zip_of(&[("main.py", b"print('beta')\n", 0o644)]))],
        )
        .await;
    let b_sha = uploaded.data()["uploadPackage"]["package"]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        get(&world.b.owner, worker_url(&b_sha), &b_worker).await,
        200
    );
    // ... and A's worker cannot download B's.
    assert_eq!(
        get(&world.a.owner, worker_url(&b_sha), &a_worker).await,
        404
    );
    assert_eq!(get(&world.a.owner, user_url(&b_sha), a_token).await, 404);
}

#[tokio::test]
async fn batch_claims_are_answered_one_by_one_and_stay_within_the_cluster() {
    use cloudtask_core::protocol::{Claim, ClaimBatch};
    use cloudtask_core::run::{RunStatus, RunTrigger};
    let world = World::new().await;
    let a_worker = worker_credential(&world, &world.a.join_token).await;
    let b_worker = worker_credential(&world, &world.b.join_token).await;
    let fire = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp() - 60, 0).unwrap();
    let skipped = |seconds: i64| Claim {
        task_id: world.a.task_id.parse().unwrap(),
        scheduled_at: fire + chrono::Duration::seconds(seconds),
        attempt: 0,
        task_version: 1,
        worker: "w1".parse().unwrap(),
        trigger: RunTrigger::Schedule,
        status: RunStatus::Skipped,
        reason: Some("misfire: recorded by a test".into()),
    };
    let post = |credential: &str, claims: Vec<Claim>| {
        world
            .a
            .owner
            .http
            .post(format!("{}/worker/claims/batch", world.api.url))
            .bearer_auth(credential)
            .json(&ClaimBatch { claims })
            .send()
    };
    let a_runs = || async {
        world
            .a
            .owner
            .run("{ runs(first: 50) { nodes { id } } }", json!({}))
            .await
            .data()["runs"]["nodes"]
            .as_array()
            .unwrap()
            .len()
    };

    // A's worker: each claim of the batch gets its own answer, in order.
    let answered = post(&a_worker, vec![skipped(0), skipped(0), skipped(1)])
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    let answers: Value = answered.json().await.unwrap();
    let answers = answers["answers"].as_array().unwrap();
    assert!(answers[0]["claimed"]["runId"].is_string(), "{answers:?}");
    assert_eq!(answers[1]["refused"]["code"], "CONFLICT", "{answers:?}");
    assert!(answers[2]["claimed"]["runId"].is_string(), "{answers:?}");
    assert_eq!(a_runs().await, 2);

    // B's worker: A's task is not found, as an unknown task would be; nothing recorded.
    let refused = post(&b_worker, vec![skipped(2)]).await.unwrap();
    assert_eq!(refused.status(), 200);
    let answers: Value = refused.json().await.unwrap();
    assert_eq!(answers["answers"][0]["refused"]["code"], "NOT_FOUND");
    assert_eq!(a_runs().await, 2);

    // Too many claims in one request: refused whole, nothing recorded.
    let claims = (0..1_001).map(|i| skipped(100 + i)).collect();
    let too_many = post(&a_worker, claims).await.unwrap();
    assert_eq!(too_many.status(), 400);
    let body: Value = too_many.json().await.unwrap();
    assert_eq!(body["code"], "BAD_USER_INPUT");
    assert_eq!(a_runs().await, 2);
}
