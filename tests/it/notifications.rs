//! Notifications end to end, on a real SMTP server (aiosmtpd, `scripts/smtp-sink.py`): a
//! failed run's mail with its details, delivery once the SMTP server is back, exactly one
//! mail when the scheduler leader is killed mid-send, an offline mail when a worker is
//! killed, a storm grouped into one digest, and signed webhook deliveries with retries.

use std::time::Duration;

use cloudtask_core::ids::TenantId;
use cloudtask_testkit::{Mail, SmtpSink};
use serde_json::{Value, json};

use crate::harness::{Cluster, Options};

const LONG: Duration = Duration::from_secs(60);

async fn cluster_with_mail(sink: &SmtpSink, extra: &[(&'static str, &str)]) -> Cluster {
    let mut notify = vec![("smtp_url", sink.url()), ("smtp_timeout_secs", "5".into())];
    notify.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    Cluster::start_with(Options {
        notify,
        ..Options::default()
    })
    .await
}

pub async fn tenant_id(cluster: &Cluster) -> TenantId {
    let me = cluster.owner.run("{ tenant { id } }", json!({})).await;
    me.data()["tenant"]["id"].as_str().unwrap().parse().unwrap()
}

async fn set_recipients(cluster: &Cluster, settings: Value) {
    let set = cluster
        .owner
        .run(
            "mutation($input: NotificationSettingsInput!) {
                setNotificationSettings(input: $input) { notifyEmails webhookUrl }
            }",
            json!({ "input": settings }),
        )
        .await;
    assert!(set.body["errors"].is_null(), "{}", set.body);
}

/// A task that fails with exit code 7 after two lines, mailed to dev@ besides the
/// tenant's default recipients.
pub async fn failing_task(cluster: &Cluster, name: &str) -> String {
    let task = cluster
        .create_task(json!({
            "name": name,
            "schedule": "0 0 1 1 *",
            "command": "echo preparing; echo 'disk full' >&2; exit 7",
            "notifyEmails": ["dev@acme.example"],
            "overlapPolicy": "ALLOW",
        }))
        .await;
    cluster.wait_assigned(&task).await;
    task
}

/// Once a delivery is marked sent, later passes (one a second) leave it alone: after two
/// more passes there is still exactly one mail.
async fn exactly_one_mail(sink: &SmtpSink) {
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        sink.mails().len(),
        1,
        "exactly one mail: {:#?}",
        sink.mails()
    );
}

fn is_failure_mail(mail: &Mail) -> bool {
    mail.subject().contains("FAILED")
}

/// The outbox rows of the tenant: (kind, channel, attempts, sent).
pub async fn outbox(cluster: &Cluster, tenant: TenantId) -> Vec<(String, String, u32, bool)> {
    cluster
        .api
        .catalogue
        .notifications_of(tenant)
        .await
        .unwrap()
        .into_iter()
        .map(|(n, sent)| {
            (
                n.kind,
                n.channel.as_str().to_owned(),
                n.attempts,
                sent.is_some(),
            )
        })
        .collect()
}

pub async fn wait_outbox(
    cluster: &Cluster,
    tenant: TenantId,
    what: &str,
    done: impl Fn(&[(String, String, u32, bool)]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let rows = outbox(cluster, tenant).await;
        if done(&rows) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_failed_run_is_mailed_once_with_what_happened() {
    let sink = SmtpSink::start().await;
    let mut cluster = cluster_with_mail(&sink, &[]).await;
    cluster.start_worker("w1");
    set_recipients(&cluster, json!({ "notifyEmails": ["ops@acme.example"] })).await;
    let task = failing_task(&cluster, "nightly-report").await;
    let run = cluster.run_now(&task).await;

    let mails = sink
        .wait_for("the failure mail", LONG, |m| !m.is_empty())
        .await;
    let mail = &mails[0];
    assert!(mail.subject().contains("nightly-report"), "{mail:#?}");
    assert!(mail.subject().contains("FAILED"), "{mail:#?}");
    let mut to = mail.envelope_to();
    to.sort();
    assert_eq!(to, ["dev@acme.example", "ops@acme.example"]);
    for expected in [
        "Cluster:    acme-cluster",
        "Worker:     w1",
        "Exit code:  7",
        "Reason:     EXIT",
        "preparing",
        "disk full",
        &format!("/runs/{run}"),
    ] {
        assert!(
            mail.body.contains(expected),
            "{expected:?} in {}",
            mail.body
        );
    }
    assert!(
        mail.header("message-id")
            .is_some_and(|id| id.ends_with("@cloudtask>")),
        "{mail:#?}"
    );
    let tenant = tenant_id(&cluster).await;
    wait_outbox(&cluster, tenant, "the delivery marked sent", |rows| {
        rows.iter()
            .any(|(k, c, _, sent)| k == "RUN_FAILED" && c == "email" && *sent)
    })
    .await;
    // Marked sent, so later passes (one a second) leave it alone.
    exactly_one_mail(&sink).await;
}

#[tokio::test]
async fn with_the_smtp_server_down_the_mail_goes_out_once_it_is_back() {
    let mut sink = SmtpSink::start().await;
    let mut cluster = cluster_with_mail(&sink, &[]).await;
    cluster.start_worker("w1");
    let task = failing_task(&cluster, "while-down").await;
    sink.stop();
    cluster.run_now(&task).await;
    let tenant = tenant_id(&cluster).await;
    // Tried and failed at least twice while the server was away.
    wait_outbox(&cluster, tenant, "failed attempts", |rows| {
        rows.iter()
            .any(|(k, _, attempts, sent)| k == "RUN_FAILED" && *attempts >= 2 && !sent)
    })
    .await;
    sink.start_again().await;
    let mails = sink
        .wait_for("the mail after the outage", LONG, |m| !m.is_empty())
        .await;
    assert!(is_failure_mail(&mails[0]), "{mails:#?}");
    wait_outbox(&cluster, tenant, "the delivery marked sent", |rows| {
        rows.iter().all(|(_, _, _, sent)| *sent)
    })
    .await;
    exactly_one_mail(&sink).await;
}

#[tokio::test]
async fn a_leader_killed_in_the_middle_of_sending_still_makes_exactly_one_mail() {
    let sink = SmtpSink::start().await;
    let mut cluster = Cluster::start_with(Options {
        in_process_scheduler: false,
        notify: vec![("smtp_url", sink.url()), ("smtp_timeout_secs", "2".into())],
        ..Options::default()
    })
    .await;
    // The first scheduler leads; the second stands by.
    let leader = cluster.spawn_scheduler_process("scheduler-a");
    cluster.start_worker("w1");
    let task = failing_task(&cluster, "mid-send").await;
    cluster.spawn_scheduler_process("scheduler-b");

    sink.hold();
    cluster.run_now(&task).await;
    sink.wait_holding(LONG).await;
    // The leader is in the SMTP conversation, before the message: kill it there.
    let mut killed = cluster.processes.remove(leader);
    killed.kill().unwrap();
    killed.wait().unwrap();
    sink.release();

    let mails = sink
        .wait_for("the mail from the new leader", LONG, |m| !m.is_empty())
        .await;
    assert!(is_failure_mail(&mails[0]), "{mails:#?}");
    let tenant = tenant_id(&cluster).await;
    wait_outbox(&cluster, tenant, "the delivery marked sent", |rows| {
        rows.iter()
            .any(|(k, _, attempts, sent)| k == "RUN_FAILED" && *sent && *attempts == 2)
    })
    .await;
    exactly_one_mail(&sink).await;
}

#[tokio::test]
async fn a_killed_worker_is_mailed_as_offline() {
    let sink = SmtpSink::start().await;
    let mut cluster = cluster_with_mail(&sink, &[]).await;
    set_recipients(&cluster, json!({ "notifyEmails": ["ops@acme.example"] })).await;
    let worker = cluster.spawn_worker_process("w-doomed");
    let task = cluster
        .create_task(json!({ "name": "any", "schedule": "0 0 1 1 *", "command": "true" }))
        .await;
    cluster.wait_assigned(&task).await;
    let mut process = cluster.processes.remove(worker);
    process.kill().unwrap();
    process.wait().unwrap();

    let mails = sink
        .wait_for("the offline mail", LONG, |m| {
            m.iter().any(|m| m.subject().contains("offline"))
        })
        .await;
    let mail = mails
        .iter()
        .find(|m| m.subject().contains("offline"))
        .unwrap();
    assert!(mail.subject().contains("w-doomed"), "{mail:#?}");
    assert!(mail.subject().contains("acme-cluster"), "{mail:#?}");
    assert_eq!(mail.envelope_to(), ["ops@acme.example"]);
    assert!(mail.body.contains("marked LOST"), "{}", mail.body);

    // The same worker back: a mail says so, once.
    cluster.spawn_worker_process("w-doomed");
    let mails = sink
        .wait_for("the back-online mail", LONG, |m| {
            m.iter().any(|m| m.subject().contains("back online"))
        })
        .await;
    let back: Vec<_> = mails
        .iter()
        .filter(|m| m.subject().contains("back online"))
        .collect();
    assert_eq!(back.len(), 1, "{back:#?}");
    assert!(back[0].subject().contains("w-doomed"), "{:#?}", back[0]);
    assert_eq!(back[0].envelope_to(), ["ops@acme.example"]);
}

#[tokio::test]
async fn a_storm_of_failures_is_grouped_into_one_digest() {
    let sink = SmtpSink::start().await;
    let mut cluster = cluster_with_mail(&sink, &[("notify_digest_window_secs", "20")]).await;
    cluster.start_worker("w1");
    let task = failing_task(&cluster, "stormy").await;
    let mut runs = Vec::new();
    for _ in 0..100 {
        runs.push(cluster.run_now(&task).await);
    }
    let tenant = tenant_id(&cluster).await;
    // The first pass mails what has failed so far (one failure, or the first few of a
    // storm faster than a pass); everything after it within the window waits and goes
    // out as one digest when the window ends.
    let mails = sink
        .wait_for(
            "the first mail and one digest",
            Duration::from_secs(90),
            |m| m.len() >= 2,
        )
        .await;
    let digest = &mails[1];
    assert!(
        digest.subject().starts_with("[CloudTask] stormy: ")
            && digest.subject().contains(" failures on acme-cluster"),
        "{digest:#?}"
    );
    // Every failure is named in one of the two mails, once.
    for run in &runs {
        let named = mails
            .iter()
            .map(|m| m.body.matches(&format!("/runs/{run}")).count())
            .sum::<usize>();
        assert_eq!(named, 1, "run {run} in {mails:#?}");
    }
    wait_outbox(&cluster, tenant, "every delivery marked sent", |rows| {
        rows.len() == 100 && rows.iter().all(|(_, _, _, sent)| *sent)
    })
    .await;
    assert_eq!(sink.mails().len(), 2);
}

/// What the webhook receiver got: headers and body of each request.
pub type Received = std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, Vec<u8>)>>>;

/// A webhook receiver: answers 500 to the first delivery and 200 after, keeping what it
/// got (headers and body).
pub async fn webhook_receiver() -> (String, Received) {
    let got: Received = Received::default();
    let store = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let store = store.clone();
                async move {
                    let mut got = store.lock().unwrap();
                    got.push((headers, body.to_vec()));
                    if got.len() == 1 {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        axum::http::StatusCode::OK
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

#[tokio::test]
async fn webhook_deliveries_are_signed_and_retried() {
    use hmac::Mac;
    let (url, got) = webhook_receiver().await;
    // No SMTP server at all: the webhook channel works on its own. The receiver is on
    // loopback, which the operator allows here (webhooks reach public addresses only).
    let mut cluster = Cluster::start_with(Options {
        notify: vec![("webhook_allow_networks", "127.0.0.1".into())],
        ..Options::default()
    })
    .await;
    cluster.start_worker("w1");
    let secret = "a-webhook-secret-of-some-length";
    set_recipients(
        &cluster,
        json!({ "notifyEmails": [], "webhookUrl": url, "webhookSecret": secret }),
    )
    .await;
    // The secret is never read back.
    let settings = cluster
        .owner
        .run(
            "{ notificationSettings { notifyEmails webhookUrl } }",
            json!({}),
        )
        .await;
    assert_eq!(
        settings.data()["notificationSettings"]["webhookUrl"],
        url.as_str()
    );
    let task = failing_task(&cluster, "hooked").await;
    let run = cluster.run_now(&task).await;

    let deadline = tokio::time::Instant::now() + LONG;
    while got.lock().unwrap().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retried delivery"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deliveries = got.lock().unwrap().clone();
    for (headers, body) in &deliveries {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(headers["x-cloudtask-signature"], expected.as_str());
        assert_eq!(headers["x-cloudtask-event"], "RUN_FAILED");
        let event: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(event["data"]["run"], run.as_str(), "{event}");
        assert_eq!(event["data"]["exitCode"], 7);
        assert_eq!(event["data"]["reason"], "EXIT", "{event}");
        assert!(event["data"]["recipients"].is_null(), "{event}");
    }
    // The retry is the same delivery.
    assert_eq!(
        deliveries[0].0["x-cloudtask-delivery"],
        deliveries[1].0["x-cloudtask-delivery"]
    );
    let tenant = tenant_id(&cluster).await;
    wait_outbox(&cluster, tenant, "the delivery marked sent", |rows| {
        rows.iter()
            .any(|(_, c, attempts, sent)| c == "webhook" && *sent && *attempts == 2)
    })
    .await;

    // Bad settings are refused and change nothing.
    let refused = cluster
        .owner
        .run(
            "mutation { setNotificationSettings(input: { notifyEmails: [\"nope\"] }) { webhookUrl } }",
            json!({}),
        )
        .await;
    assert_eq!(refused.expect_code(), "BAD_USER_INPUT");
    let refused = cluster
        .owner
        .run(
            "mutation { setNotificationSettings(input: { notifyEmails: [], webhookUrl: \"ftp://x\" }) { webhookUrl } }",
            json!({}),
        )
        .await;
    assert_eq!(refused.expect_code(), "BAD_USER_INPUT");
    let after = cluster
        .owner
        .run("{ notificationSettings { webhookUrl } }", json!({}))
        .await;
    assert_eq!(
        after.data()["notificationSettings"]["webhookUrl"],
        url.as_str()
    );
}
