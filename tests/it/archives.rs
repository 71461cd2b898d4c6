//! Malicious and malformed archives uploaded through GraphQL multipart: each is refused
//! with BAD_USER_INPUT naming the upload field, and nothing is stored.

use cloudtask_core::archive::samples;
use cloudtask_core::config::Config;
use cloudtask_testkit::{Gql, GqlResponse, TestApi};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};

use crate::support::{ADMIN_EMAIL, CREATE_TASK, PASSWORD, task_input};

const UPLOAD_PACKAGE: &str = "mutation($id: ID!, $file: Upload!) {
    uploadPackage(taskId: $id, file: $file) { id version package { sha256 format } }
}";

const MIB: u64 = 1 << 20;

/// One tenant with an owner, a cluster and a task that already has a package.
struct Setup {
    api: TestApi,
    owner: Gql,
    cluster_id: String,
    task_id: String,
    package_sha: String,
}

async fn setup(adjust: impl FnOnce(&mut Config)) -> Setup {
    let api = TestApi::start_with(adjust).await;
    api.create_user(ADMIN_EMAIL, PASSWORD, true).await;
    let admin = api.login(ADMIN_EMAIL, PASSWORD, None).await;
    let tenant = admin
        .run(
            "mutation($input: CreateTenantInput!) { createTenant(input: $input) { id } }",
            json!({ "input": {
                "name": "gamma",
                "ownerEmail": "owner@gamma.example",
                "ownerPassword": PASSWORD,
            } }),
        )
        .await;
    let tenant_id = tenant.data()["createTenant"]["id"].as_str().unwrap();
    let owner = api
        .login("owner@gamma.example", PASSWORD, Some(tenant_id))
        .await;
    let cluster = owner
        .run(
            "mutation { createCluster(name: \"gamma-cluster\") { cluster { id } } }",
            json!({}),
        )
        .await;
    let cluster_id = cluster.data()["createCluster"]["cluster"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let first = samples::tar_gz_of(&[("run.sh", b"#!/bin/sh\necho first\n", 0o755)]);
    let task = create_task(&owner, &cluster_id, "gamma-task", "job.tar.gz", first).await;
    let task = &task.data()["createTask"];
    Setup {
        api,
        owner,
        cluster_id,
        task_id: task["id"].as_str().unwrap().to_owned(),
        package_sha: task["package"]["sha256"].as_str().unwrap().to_owned(),
    }
}

async fn create_task(
    owner: &Gql,
    cluster_id: &str,
    name: &str,
    file_name: &str,
    bytes: Vec<u8>,
) -> GqlResponse {
    let mut input = task_input(cluster_id, name);
    input["package"] = Value::Null;
    owner
        .upload(
            CREATE_TASK,
            json!({ "input": input }),
            vec![("variables.input.package", file_name, bytes)],
        )
        .await
}

async fn upload_package(
    owner: &Gql,
    task_id: &str,
    file_name: &str,
    bytes: Vec<u8>,
) -> GqlResponse {
    owner
        .upload(
            UPLOAD_PACKAGE,
            json!({ "id": task_id, "file": null }),
            vec![("variables.file", file_name, bytes)],
        )
        .await
}

impl Setup {
    /// What a refused upload must leave as it was: every task with its version, package
    /// and history, the audit log, and the stored packages.
    async fn state(&self) -> Value {
        let seen = self
            .owner
            .run(
                "{
                    tasks(first: 200) { edges { node {
                        id name version package { sha256 } versions { version }
                    } } }
                    auditLog(first: 200) { edges { node { id } } }
                }",
                json!({}),
            )
            .await;
        let packages = self
            .api
            .catalogue
            .connection()
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT COUNT(*) AS n FROM packages",
            ))
            .await
            .expect("counting packages")
            .expect("a row");
        let mut state = seen.data().clone();
        state["storedPackages"] = json!(packages.try_get::<i64>("", "n").expect("count"));
        state
    }

    fn task_count(state: &Value) -> usize {
        state["tasks"]["edges"].as_array().unwrap().len()
    }

    /// Status of `GET /packages/{sha256}` with the owner's token.
    async fn download_status(&self, sha256: &str) -> u16 {
        self.owner
            .http
            .get(format!("{}/packages/{sha256}", self.api.url))
            .bearer_auth(self.owner.token.as_deref().unwrap())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Uploads `bytes` with createTask and with uploadPackage; both must be refused with
    /// BAD_USER_INPUT naming the field, a message containing `reason`, and no trace.
    async fn assert_refused(&self, what: &str, file_name: &str, bytes: Vec<u8>, reason: &str) {
        let before = self.state().await;
        let sha = sha256_hex(&bytes);

        let created = create_task(
            &self.owner,
            &self.cluster_id,
            "should-not-exist",
            file_name,
            bytes.clone(),
        )
        .await;
        assert_refusal(&created, "package", reason, &format!("createTask: {what}"));
        let uploaded = upload_package(&self.owner, &self.task_id, file_name, bytes).await;
        assert_refusal(&uploaded, "file", reason, &format!("uploadPackage: {what}"));

        let after = self.state().await;
        assert_eq!(
            Self::task_count(&after),
            Self::task_count(&before),
            "{what}: no task created"
        );
        assert_eq!(after, before, "{what}: nothing changed");
        let task = self
            .owner
            .run(
                "query($id: ID!) { task(id: $id) { version package { sha256 } } }",
                json!({ "id": self.task_id }),
            )
            .await;
        assert_eq!(task.data()["task"]["version"], 1, "{what}");
        assert_eq!(
            task.data()["task"]["package"]["sha256"],
            self.package_sha.as_str(),
            "{what}: the task keeps its package"
        );
        assert_eq!(
            self.download_status(&sha).await,
            404,
            "{what}: the refused archive is not downloadable"
        );
    }
}

fn assert_refusal(response: &GqlResponse, field: &str, reason: &str, what: &str) {
    assert_eq!(
        response.code(),
        Some("BAD_USER_INPUT"),
        "{what}: {}",
        response.body
    );
    assert_eq!(
        response.body["errors"][0]["extensions"]["field"], field,
        "{what}: {}",
        response.body
    );
    assert!(
        response.message().contains(reason),
        "{what}: the message says why ({reason:?}): {}",
        response.body
    );
    assert!(response.body["data"].is_null(), "{what}: {}", response.body);
}

/// Bytes no compressor can shrink (random UUIDs), not starting with an archive's magic.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = std::iter::repeat_with(|| *uuid::Uuid::new_v4().as_bytes())
        .flatten()
        .take(len)
        .collect();
    bytes[0] = b'R';
    bytes
}

#[tokio::test]
async fn path_and_link_attacks_are_refused() {
    let s = setup(|_| {}).await;
    s.assert_refused("zip slip", "slip.zip", samples::zip_slip(), "`..`")
        .await;
    s.assert_refused(
        "absolute path in a tar",
        "abs.tar.gz",
        samples::tar_absolute(),
        "absolute path",
    )
    .await;
    s.assert_refused(
        "symlink out of the tree in a zip",
        "link.zip",
        samples::zip_symlink_out(),
        "link pointing outside",
    )
    .await;
    s.assert_refused(
        "symlink out of the tree in a tar",
        "link.tar.gz",
        samples::tar_gz_of(&[("link", b"/etc/passwd", 0o120_777)]),
        "link pointing outside",
    )
    .await;
    s.assert_refused(
        "zip slip behind a directory",
        "deep.zip",
        samples::zip_of(&[("a/b/../../../evil", b"evil", 0o644)]),
        "`..`",
    )
    .await;
}

#[tokio::test]
async fn archive_bombs_are_refused() {
    let s = setup(|config| config.max_unpacked_bytes = 10 * MIB).await;
    let zip_bomb = samples::zip_bomb(100 * MIB);
    let tar_bomb = samples::tar_gz_bomb(100 * MIB);
    assert!(zip_bomb.len() < MIB as usize && tar_bomb.len() < MIB as usize);
    s.assert_refused("zip bomb", "bomb.zip", zip_bomb, "unpacks to more than")
        .await;
    s.assert_refused(
        "tar.gz bomb",
        "bomb.tar.gz",
        tar_bomb,
        "unpacks to more than",
    )
    .await;
}

#[tokio::test]
async fn files_that_are_not_archives_are_refused() {
    let s = setup(|_| {}).await;
    s.assert_refused(
        "plain text",
        "run.sh",
        b"#!/bin/sh\necho not an archive\n".to_vec(),
        "not a zip or tar.gz",
    )
    .await;
    s.assert_refused(
        "random bytes",
        "random.zip",
        random_bytes(4096),
        "not a zip or tar.gz",
    )
    .await;
    s.assert_refused(
        "empty file",
        "empty.zip",
        Vec::new(),
        "not a zip or tar.gz archive",
    )
    .await;
    let zip = samples::zip_of(&[("main.py", &random_bytes(8192), 0o644)]);
    s.assert_refused(
        "truncated zip",
        "cut.zip",
        zip[..zip.len() / 2].to_vec(),
        "damaged or unreadable",
    )
    .await;
    let tar = samples::tar_gz_of(&[("main.py", &random_bytes(8192), 0o644)]);
    s.assert_refused(
        "truncated tar.gz",
        "cut.tar.gz",
        tar[..tar.len() / 2].to_vec(),
        "damaged or unreadable",
    )
    .await;
}

#[tokio::test]
async fn an_archive_over_the_package_limit_is_refused_by_the_resolver() {
    let s = setup(|config| config.max_package_bytes = 64 * 1024).await;
    // A valid zip of 100 KiB: random content does not compress below the limit.
    let big = samples::zip_of(&[("data.bin", &random_bytes(100 * 1024), 0o644)]);
    assert!(big.len() > 100 * 1024);
    s.assert_refused("oversize zip", "big.zip", big, "larger than the limit")
        .await;

    // Past the multipart body limit (twice the package limit plus 1 MiB), the HTTP layer
    // refuses the request before GraphQL sees it.
    let before = s.state().await;
    let huge = samples::zip_of(&[("data.bin", &random_bytes(2 * MIB as usize), 0o644)]);
    let refused = upload_package(&s.owner, &s.task_id, "huge.zip", huge).await;
    assert_eq!(refused.status, 413, "{}", refused.body);
    assert_eq!(refused.code(), Some("BAD_USER_INPUT"), "{}", refused.body);
    assert_eq!(s.state().await, before, "nothing changed");

    // Control: a small archive still goes through under the lowered limit.
    let small = samples::zip_of(&[("main.py", b"print('ok')\n", 0o644)]);
    let accepted = upload_package(&s.owner, &s.task_id, "small.zip", small).await;
    assert_eq!(accepted.data()["uploadPackage"]["version"], 2);
}

#[tokio::test]
async fn valid_zip_and_tar_gz_are_accepted() {
    let s = setup(|_| {}).await;
    let before = s.state().await;

    let zip = samples::zip_of(&[
        ("bin/", b"", 0o755),
        ("bin/run.sh", b"#!/bin/sh\necho zip\n", 0o755),
        ("lib/data.txt", b"data\n", 0o644),
        ("current", b"bin", 0o120_777),
    ]);
    let zip_sha = sha256_hex(&zip);
    let created = create_task(&s.owner, &s.cluster_id, "zipped", "job.zip", zip.clone()).await;
    let created = &created.data()["createTask"];
    assert_eq!(created["version"], 1);
    assert_eq!(created["package"]["sha256"], zip_sha.as_str());

    let tar = samples::tar_gz_of(&[
        ("app/", b"", 0o755),
        ("app/run.sh", b"#!/bin/sh\necho tar\n", 0o755),
        ("app/link", b"run.sh", 0o120_777),
    ]);
    let tar_sha = sha256_hex(&tar);
    let uploaded = upload_package(&s.owner, &s.task_id, "job.tar.gz", tar.clone()).await;
    let uploaded = &uploaded.data()["uploadPackage"];
    assert_eq!(uploaded["version"], 2);
    assert_eq!(uploaded["package"]["sha256"], tar_sha.as_str());
    assert_eq!(uploaded["package"]["format"], "tar.gz");

    for (sha, bytes) in [(&zip_sha, &zip), (&tar_sha, &tar)] {
        let fetched = s
            .owner
            .http
            .get(format!("{}/packages/{sha}", s.api.url))
            .bearer_auth(s.owner.token.as_deref().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(fetched.status(), 200);
        assert_eq!(&fetched.bytes().await.unwrap().to_vec(), bytes);
    }
    let after = s.state().await;
    assert_eq!(Setup::task_count(&after), Setup::task_count(&before) + 1);
    assert_eq!(after["storedPackages"], 3);
}

/// SHA-256 (FIPS 180-4), so the tests can name a refused archive by hash without a
/// dependency; checked against the server's own hashes of the accepted archives.
fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (state, value) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *state = state.wrapping_add(value);
        }
    }
    h.iter().map(|word| format!("{word:08x}")).collect()
}

#[test]
fn sha256_matches_known_answers() {
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
}
