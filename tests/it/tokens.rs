//! Token attacks over HTTP: missing, forged, expired and misused access tokens; refresh
//! token rotation, reuse and logout; the login rate limit; membership checked per request.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cloudtask_testkit::{Gql, GqlResponse, TEST_JWT_SECRET, TestApi};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::support::{PASSWORD, World};

const LOGIN: &str = "mutation($e: String!, $p: String!, $t: ID) {
    login(email: $e, password: $p, tenantId: $t) {
        accessToken refreshToken user { id } tenant { id }
    }
}";
const REFRESH: &str = "mutation($r: String!) {
    refreshToken(refreshToken: $r) { accessToken refreshToken tenant { id } }
}";
const LOGOUT: &str = "mutation($r: String!) { logout(refreshToken: $r) }";
const ME: &str = "{ me { id email } }";
const TASKS: &str = "{ tasks(first: 10) { edges { node { id } } } }";
const CREATE_CLUSTER: &str =
    "mutation($n: String!) { createCluster(name: $n) { cluster { id } joinToken } }";

/// A sha256 no package has: the download route must answer on authentication alone.
const SOME_SHA: &str = "0000000000000000000000000000000000000000000000000000000000000000";

struct Login {
    access: String,
    refresh: String,
    user_id: String,
}

async fn login(api: &TestApi, email: &str, password: &str, tenant_id: Option<&str>) -> Login {
    let response = api
        .client()
        .run(LOGIN, json!({ "e": email, "p": password, "t": tenant_id }))
        .await;
    let data = &response.data()["login"];
    Login {
        access: data["accessToken"]
            .as_str()
            .expect("access token")
            .to_owned(),
        refresh: data["refreshToken"]
            .as_str()
            .expect("refresh token")
            .to_owned(),
        user_id: data["user"]["id"].as_str().expect("user id").to_owned(),
    }
}

async fn refresh(api: &TestApi, token: &str) -> GqlResponse {
    api.client().run(REFRESH, json!({ "r": token })).await
}

fn task_ids(response: &GqlResponse) -> Vec<String> {
    response.data()["tasks"]["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| e["node"]["id"].as_str().expect("id").to_owned())
        .collect()
}

fn assert_unauthenticated(response: &GqlResponse, what: &str) {
    assert_eq!(
        response.code(),
        Some("UNAUTHENTICATED"),
        "{what}: {}",
        response.body
    );
    assert!(
        response.body["data"].is_null(),
        "{what}: no data leaks: {}",
        response.body
    );
}

/// `token` reaches neither the caller's profile, nor tenant data, nor a mutation.
async fn assert_token_refused(api: &TestApi, token: &str, what: &str) {
    let client = api.client().with_token(token);
    assert_unauthenticated(&client.run(ME, json!({})).await, &format!("{what}: me"));
    assert_unauthenticated(
        &client.run(TASKS, json!({})).await,
        &format!("{what}: tasks"),
    );
    assert_unauthenticated(
        &client
            .run(CREATE_CLUSTER, json!({ "n": format!("via {what}") }))
            .await,
        &format!("{what}: createCluster"),
    );
}

/// The HTTP status of downloading a package (none has `SOME_SHA`: the answer is about the
/// token alone) with `token`, or without one.
async fn package_download(api: &TestApi, token: Option<&str>) -> u16 {
    let mut request = api
        .client()
        .http
        .get(format!("{}/packages/{SOME_SHA}", api.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().status().as_u16()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Claims shaped like the API's own access tokens.
fn user_claims(user_id: &str, tenant_id: &str, exp: i64) -> Value {
    json!({
        "sub": user_id,
        "aud": "cloudtask-user",
        "exp": exp,
        "iat": now() - 10,
        "tid": tenant_id,
        "pa": false,
    })
}

fn sign(algorithm: Algorithm, secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("signing a test token")
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// A token with a hand-made header, HMAC-SHA256-signed with `secret` (empty signature when
/// `secret` is `None`).
fn hand_made(header: Value, claims: &Value, secret: Option<&str>) -> String {
    let input = format!("{}.{}", b64(&header), b64(claims));
    let signature = match secret {
        Some(secret) => jsonwebtoken::crypto::sign(
            input.as_bytes(),
            &EncodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
        )
        .expect("hmac"),
        None => String::new(),
    };
    format!("{input}.{signature}")
}

#[tokio::test]
async fn requests_without_a_token_are_unauthenticated() {
    let world = World::new().await;
    let anonymous = world.api.client();
    for (what, query) in [
        ("me", ME),
        ("tasks", TASKS),
        ("clusters", "{ clusters { id } }"),
        ("members", "{ members { role } }"),
    ] {
        assert_unauthenticated(&anonymous.run(query, json!({})).await, what);
    }
    assert_unauthenticated(
        &anonymous
            .run(CREATE_CLUSTER, json!({ "n": "anonymous" }))
            .await,
        "createCluster",
    );
    assert_unauthenticated(
        &anonymous
            .run(
                "mutation($id: ID!) { deleteTask(id: $id) }",
                json!({ "id": world.a.task_id }),
            )
            .await,
        "deleteTask",
    );
    assert_eq!(
        package_download(&world.api, None).await,
        401,
        "package download without a token"
    );

    // Nothing was created or deleted.
    let clusters = world.a.owner.run("{ clusters { name } }", json!({})).await;
    assert_eq!(clusters.data()["clusters"].as_array().unwrap().len(), 1);
    let tasks = world.a.owner.run(TASKS, json!({})).await;
    assert_eq!(task_ids(&tasks), vec![world.a.task_id.clone()]);
}

#[tokio::test]
async fn forged_tokens_are_refused() {
    let world = World::new().await;
    let api = &world.api;
    let real = login(api, &world.a.owner_email, PASSWORD, Some(&world.a.id)).await;
    let claims = user_claims(&real.user_id, &world.a.id, now() + 600);

    // Control: these claims, signed as the API signs, are accepted. Every forgery below
    // differs from this token in one respect only.
    let genuine = sign(Algorithm::HS256, TEST_JWT_SECRET, &claims);
    let tasks = api
        .client()
        .with_token(&genuine)
        .run(TASKS, json!({}))
        .await;
    assert_eq!(task_ids(&tasks), vec![world.a.task_id.clone()]);

    let other_secret = sign(
        Algorithm::HS256,
        "another-secret-another-secret-0123456789",
        &claims,
    );
    assert_token_refused(api, &other_secret, "signed with another secret").await;

    let alg_none = hand_made(json!({ "alg": "none", "typ": "JWT" }), &claims, None);
    assert_token_refused(api, &alg_none, "alg none").await;
    let alg_none_signed = hand_made(
        json!({ "alg": "none", "typ": "JWT" }),
        &claims,
        Some(TEST_JWT_SECRET),
    );
    assert_token_refused(api, &alg_none_signed, "alg none with a signature").await;

    let hs512 = sign(Algorithm::HS512, TEST_JWT_SECRET, &claims);
    assert_token_refused(api, &hs512, "HS512 with the right secret").await;
    let hs384 = sign(Algorithm::HS384, TEST_JWT_SECRET, &claims);
    assert_token_refused(api, &hs384, "HS384 with the right secret").await;

    // Algorithm confusion: an RS256 header over an HMAC signature made with the secret.
    let rs256 = hand_made(
        json!({ "alg": "RS256", "typ": "JWT" }),
        &claims,
        Some(TEST_JWT_SECRET),
    );
    assert_token_refused(api, &rs256, "RS256 header, HMAC signature").await;

    // A genuine token whose claims were edited (platform admin) keeps its old signature.
    let mut escalated = claims.clone();
    escalated["pa"] = json!(true);
    let signature = genuine.rsplit('.').next().unwrap();
    let header = genuine.split('.').next().unwrap();
    let tampered = format!("{header}.{}.{signature}", b64(&escalated));
    assert_token_refused(api, &tampered, "claims edited after signing").await;

    // Right secret, wrong audience (a worker's), or no audience at all.
    let mut worker_aud = claims.clone();
    worker_aud["aud"] = json!("cloudtask-worker");
    let worker_aud = sign(Algorithm::HS256, TEST_JWT_SECRET, &worker_aud);
    assert_token_refused(api, &worker_aud, "worker audience").await;
    let mut no_aud = claims.clone();
    no_aud.as_object_mut().unwrap().remove("aud");
    let no_aud = sign(Algorithm::HS256, TEST_JWT_SECRET, &no_aud);
    assert_token_refused(api, &no_aud, "no audience").await;

    // Not a JWT at all.
    assert_token_refused(api, "garbage", "garbage").await;
    assert_token_refused(api, "a.b.c", "three garbage parts").await;

    // Nothing the forgeries tried to create exists.
    let clusters = world.a.owner.run("{ clusters { name } }", json!({})).await;
    assert_eq!(clusters.data()["clusters"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn expired_access_tokens_are_refused_with_the_reason() {
    let world = World::new().await;
    let api = &world.api;
    let real = login(api, &world.a.owner_email, PASSWORD, Some(&world.a.id)).await;
    let expired = sign(
        Algorithm::HS256,
        TEST_JWT_SECRET,
        &user_claims(&real.user_id, &world.a.id, now() - 60),
    );
    assert_token_refused(api, &expired, "expired").await;
    // A subscription socket with it is closed with the protocol's refusal.
    let mut socket = cloudtask_testkit::GqlSocket::open(&api.url).await;
    socket
        .send(json!({ "type": "connection_init", "payload": { "accessToken": expired } }))
        .await;
    match socket.frame(std::time::Duration::from_secs(10)).await {
        tokio_tungstenite::tungstenite::Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 4403)
        }
        other => panic!("expected a close, got {other:?}"),
    }
    let response = api.client().with_token(&expired).run(ME, json!({})).await;
    assert!(
        response.message().contains("expired"),
        "the message says why: {}",
        response.body
    );
    assert_eq!(
        package_download(api, Some(&expired)).await,
        401,
        "package download with an expired token"
    );
}

#[tokio::test]
async fn an_access_token_expires_after_its_ttl_and_the_refresh_token_renews_it() {
    let api = TestApi::start_with(|config| config.access_token_ttl_secs = 1).await;
    api.create_user("short@example.com", PASSWORD, false).await;
    let session = login(&api, "short@example.com", PASSWORD, None).await;
    let client = api.client().with_token(&session.access);
    assert_eq!(
        client.run(ME, json!({})).await.data()["me"]["id"],
        session.user_id.as_str()
    );
    tokio::time::sleep(std::time::Duration::from_millis(2_200)).await;
    let late = client.run(ME, json!({})).await;
    assert_unauthenticated(&late, "after the TTL");
    assert!(late.message().contains("expired"), "{}", late.body);

    let renewed = refresh(&api, &session.refresh).await;
    let access = renewed.data()["refreshToken"]["accessToken"]
        .as_str()
        .unwrap();
    let me = api.client().with_token(access).run(ME, json!({})).await;
    assert_eq!(me.data()["me"]["id"], session.user_id.as_str());
}

#[tokio::test]
async fn a_worker_credential_is_not_a_user_token() {
    let world = World::new().await;
    let api = &world.api;
    let join = api
        .client()
        .http
        .post(format!("{}/worker/join", api.url))
        .json(&json!({ "token": world.a.join_token }))
        .send()
        .await
        .unwrap();
    assert_eq!(join.status(), 200);
    let credential = join.json::<Value>().await.unwrap()["credential"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_token_refused(api, &credential, "worker credential").await;
    assert_eq!(
        package_download(api, Some(&credential)).await,
        401,
        "user package route with a worker credential"
    );

    // And the other way round: a user's access token is no worker credential.
    let user_token = world.a.owner.token.clone().unwrap();
    let worker_route = api
        .client()
        .http
        .get(format!("{}/worker/packages/{SOME_SHA}", api.url))
        .bearer_auth(&user_token)
        .send()
        .await
        .unwrap();
    assert_eq!(worker_route.status(), 401, "worker route with a user token");

    // An unknown join token gets no credential.
    let bad_join = api
        .client()
        .http
        .post(format!("{}/worker/join", api.url))
        .json(&json!({ "token": "ctj_not-a-real-token" }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_join.status(), 401);
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_reused_one_revokes_the_whole_login() {
    let world = World::new().await;
    let api = &world.api;
    let first = login(api, &world.a.owner_email, PASSWORD, Some(&world.a.id)).await;
    let other_login = login(api, &world.a.owner_email, PASSWORD, Some(&world.a.id)).await;

    // Rotation: a new pair, the access token works and keeps the tenant.
    let rotated = refresh(api, &first.refresh).await;
    let rotated = &rotated.data()["refreshToken"];
    let second_refresh = rotated["refreshToken"].as_str().unwrap().to_owned();
    assert_ne!(second_refresh, first.refresh, "a new refresh token");
    assert_eq!(rotated["tenant"]["id"], world.a.id.as_str());
    let access = rotated["accessToken"].as_str().unwrap();
    let tasks = api.client().with_token(access).run(TASKS, json!({})).await;
    assert_eq!(task_ids(&tasks), vec![world.a.task_id.clone()]);

    // The spent token no longer works: presenting it again is reuse...
    let reused = refresh(api, &first.refresh).await;
    assert_unauthenticated(&reused, "spent refresh token");
    assert!(reused.message().contains("already used"), "{}", reused.body);
    // ...which revokes the whole family, including its newest token...
    let newest = refresh(api, &second_refresh).await;
    assert_unauthenticated(&newest, "newest token of a revoked family");
    // ...and the access tokens issued to it, though they have not expired.
    assert_token_refused(api, access, "an access token of a replayed login").await;
    assert_token_refused(api, &first.access, "the first access token of it").await;

    // Another login of the same user is a separate family and still works.
    let other = refresh(api, &other_login.refresh).await;
    assert!(
        other.data()["refreshToken"]["refreshToken"].is_string(),
        "{}",
        other.body
    );

    // Tokens that were never issued.
    assert_unauthenticated(&refresh(api, "rt_garbage").await, "unknown refresh token");
    assert_unauthenticated(
        &refresh(api, &first.access).await,
        "an access token as a refresh token",
    );
}

#[tokio::test]
async fn logout_revokes_the_refresh_token_and_its_family() {
    let world = World::new().await;
    let api = &world.api;
    let session = login(api, &world.a.owner_email, PASSWORD, Some(&world.a.id)).await;
    let rotated = refresh(api, &session.refresh).await;
    let current = rotated.data()["refreshToken"]["refreshToken"]
        .as_str()
        .unwrap()
        .to_owned();

    let client = api.client().with_token(&session.access);
    let out = client.run(LOGOUT, json!({ "r": current })).await;
    assert_eq!(out.data()["logout"], true);
    assert_unauthenticated(&refresh(api, &current).await, "refresh after logout");
    assert_unauthenticated(
        &refresh(api, &session.refresh).await,
        "older token of the logged-out family",
    );

    // Logging out with an unknown token changes nothing and says so.
    let other = login(api, &world.a.owner_email, PASSWORD, Some(&world.a.id)).await;
    let unknown = other
        .client(api)
        .run(LOGOUT, json!({ "r": "rt_unknown" }))
        .await;
    assert_eq!(unknown.data()["logout"], false);
}

impl Login {
    fn client(&self, api: &TestApi) -> Gql {
        api.client().with_token(&self.access)
    }
}

/// Waits (10 s at most) until `server` refuses `token`.
async fn until_refused(server: &TestApi, token: &str, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let me = server.client().with_token(token).run(ME, json!({})).await;
        if me.code() == Some("UNAUTHENTICATED") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} still accepts the logged-out token after 10 s: {}",
            me.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A logged-out access token is refused at once, on the replica that logged it out and on
/// every other, although it has not expired; another login of the same user goes on.
#[tokio::test]
async fn an_access_token_is_refused_once_its_login_is_logged_out_on_every_replica() {
    let world = World::new().await;
    let api = &world.api;
    let replica = api.replica().await;
    let session = login(api, &world.a.owner_email, PASSWORD, Some(&world.a.id)).await;
    let other = login(api, &world.a.owner_email, PASSWORD, Some(&world.a.id)).await;
    for server in [api, &replica] {
        let tasks = session.client(server).run(TASKS, json!({})).await;
        assert_eq!(task_ids(&tasks), vec![world.a.task_id.clone()]);
    }

    let out = session
        .client(api)
        .run(LOGOUT, json!({ "r": session.refresh }))
        .await;
    assert_eq!(out.data()["logout"], true);
    // The replica that answered the logout refuses the token before it answers.
    assert_token_refused(api, &session.access, "a logged-out token").await;
    assert_eq!(
        package_download(api, Some(&session.access)).await,
        401,
        "package download with a logged-out token"
    );
    // Another replica hears of it through the catalogue's events; one started after the
    // logout knows it from the start.
    until_refused(&replica, &session.access, "the other replica").await;
    assert_token_refused(&replica, &session.access, "a logged-out token, elsewhere").await;
    let late = api.replica().await;
    assert_token_refused(&late, &session.access, "a replica started after the logout").await;

    // The user's other login is untouched.
    for server in [api, &replica, &late] {
        let tasks = other.client(server).run(TASKS, json!({})).await;
        assert_eq!(task_ids(&tasks), vec![world.a.task_id.clone()]);
    }
}

/// An address that used up its failures is refused, even with the right password and for
/// any account. (An account's own failures only slow it down: see
/// `hostile::strangers_failing_from_many_addresses_do_not_lock_the_owner_out`.)
#[tokio::test]
async fn login_attempts_are_limited_per_address() {
    let api = TestApi::start_with(|config| config.login_max_attempts = 3).await;
    api.create_user("victim@example.com", PASSWORD, false).await;
    api.create_user("bystander@example.com", PASSWORD, false)
        .await;
    let attempt = |email: &'static str, password: &'static str| {
        let client = api.client();
        async move {
            client
                .run(LOGIN, json!({ "e": email, "p": password, "t": null }))
                .await
        }
    };

    // Control: the right password works before any failure.
    let ok = attempt("bystander@example.com", PASSWORD).await;
    assert!(ok.data()["login"]["accessToken"].is_string());

    for i in 1..=3 {
        let wrong = attempt("victim@example.com", "wrong password").await;
        assert_unauthenticated(&wrong, &format!("wrong password #{i}"));
    }
    let limited = attempt("victim@example.com", PASSWORD).await;
    assert_eq!(
        limited.code(),
        Some("RATE_LIMITED"),
        "4th attempt, right password: {}",
        limited.body
    );
    assert!(limited.body["data"].is_null(), "{}", limited.body);
    let retry = limited.body["errors"][0]["extensions"]["retryAfterSeconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("retryAfterSeconds: {}", limited.body));
    assert!(retry >= 1, "{}", limited.body);

    // The same client address is limited for any account.
    let other = attempt("bystander@example.com", PASSWORD).await;
    assert_eq!(
        other.code(),
        Some("RATE_LIMITED"),
        "another account from the same address: {}",
        other.body
    );
}

#[tokio::test]
async fn a_removed_member_loses_access_at_once_despite_a_valid_token() {
    let world = World::new().await;
    let api = &world.api;
    let owner = &world.a.owner;
    let email = "operator@alpha.example";
    let added = owner
        .run(
            "mutation($input: AddMemberInput!) { addMember(input: $input) { user { id } role } }",
            json!({ "input": { "email": email, "role": "OPERATOR", "password": PASSWORD } }),
        )
        .await;
    let user_id = added.data()["addMember"]["user"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let session = login(api, email, PASSWORD, Some(&world.a.id)).await;
    let member: Gql = api.client().with_token(&session.access);
    let before = member.run(TASKS, json!({})).await;
    assert_eq!(task_ids(&before), vec![world.a.task_id.clone()]);

    let removed = owner
        .run(
            "mutation($id: ID!) { removeMember(userId: $id) }",
            json!({ "id": user_id }),
        )
        .await;
    assert_eq!(removed.data()["removeMember"], true);

    // The access token is still unexpired and well signed, yet tenant data is closed.
    for (what, query, variables) in [
        ("tasks", TASKS, json!({})),
        (
            "task",
            "query($id: ID!) { task(id: $id) { id } }",
            json!({ "id": world.a.task_id }),
        ),
        ("clusters", "{ clusters { id } }", json!({})),
        (
            "pauseTask",
            "mutation($id: ID!) { pauseTask(id: $id) { state } }",
            json!({ "id": world.a.task_id }),
        ),
        (
            "createCluster",
            CREATE_CLUSTER,
            json!({ "n": "after removal" }),
        ),
    ] {
        let response = member.run(query, variables).await;
        assert_eq!(
            response.code(),
            Some("FORBIDDEN"),
            "{what} after removal: {}",
            response.body
        );
        assert!(
            response.body["data"].is_null()
                || response.body["data"]
                    .as_object()
                    .is_some_and(|d| d.values().all(Value::is_null)),
            "{what}: no data: {}",
            response.body
        );
    }
    assert_eq!(
        package_download(api, Some(&session.access)).await,
        403,
        "package route after removal"
    );

    // Nor can the refresh token mint a new access token for that tenant.
    assert_unauthenticated(
        &refresh(api, &session.refresh).await,
        "refresh after removal",
    );

    // The task was not paused and no cluster was created.
    let task = owner
        .run(
            "query($id: ID!) { task(id: $id) { state } }",
            json!({ "id": world.a.task_id }),
        )
        .await;
    assert_eq!(task.data()["task"]["state"], "ACTIVE");
    let clusters = owner.run("{ clusters { name } }", json!({})).await;
    assert_eq!(clusters.data()["clusters"].as_array().unwrap().len(), 1);
}

/// The claims of a token the API issued (its signature is checked by the API itself).
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("json")
}

#[tokio::test]
async fn an_access_token_carries_the_user_the_tenant_and_the_role() {
    let world = World::new().await;
    let owner = login(
        &world.api,
        &world.a.owner_email,
        PASSWORD,
        Some(&world.a.id),
    )
    .await;
    let claims = claims_of(&owner.access);
    assert_eq!(claims["sub"], owner.user_id.as_str(), "{claims}");
    assert_eq!(claims["tid"], world.a.id.as_str(), "{claims}");
    assert_eq!(claims["role"], "OWNER", "{claims}");
    assert_eq!(claims["aud"], "cloudtask-user", "{claims}");
}
