//! What one request may cost. A small query can ask for a huge answer (600 aliases of a
//! run's 5,000 log lines), so:
//! - lists cost their requested size (`first`, `limit`, `count`, or [`UNSIZED_LIST`] for
//!   lists without one) times what each item costs; the total is checked against
//!   `query_max_complexity` before anything runs ([`list`], used in `complexity = …`);
//! - the operations of one HTTP batch (at most `query_max_batch`) share that budget;
//! - the answer's text is counted as it is resolved and stops at `query_max_answer_bytes`
//!   (later fields fail at once with one error);
//! - an answer carries at most [`MAX_ERRORS`] errors, each at most [`MAX_MESSAGE`] long;
//! - heavy queries and mutations (costing `query_heavy_complexity` or more) take the
//!   caller's turn ([`crate::AppState::heavy`]) and hold it until their answer is written:
//!   one caller's big answers run one at a time, on at most one core.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextExecute, NextResolve, NextValidation,
    ResolveInfo,
};
use async_graphql::{Response, ServerError, ServerResult, ValidationResult, Value};

/// The assumed length of a list that takes no size (a tenant's clusters, members, a task's
/// versions): what an ordinary tenant has at most.
pub const UNSIZED_LIST: usize = 100;
/// Errors kept in one answer; the rest are summed up in one more.
pub const MAX_ERRORS: usize = 10;
/// Longest error message kept, in characters.
pub const MAX_MESSAGE: usize = 500;

/// A list of `size` items (the default when not given), each costing `child`.
pub fn list(size: Option<i32>, default: i32, child: usize) -> usize {
    let size = size.unwrap_or(default).max(1) as usize;
    size.saturating_mul(child.max(1))
}

/// What one HTTP batch has spent so far, shared by its operations (through the request
/// data, which every operation of a batch gets a clone of).
#[derive(Clone, Default)]
pub struct Spent(Arc<SpentInner>);

#[derive(Default)]
struct SpentInner {
    complexity: AtomicUsize,
    answer_bytes: AtomicUsize,
    /// The caller's turn for heavy operations, once one of them took it: kept until the
    /// answer is written (the HTTP handler drops its clone after writing it).
    turn: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
}

impl Spent {
    /// The text of the answer so far, in bytes.
    pub fn answer_bytes(&self) -> usize {
        self.0.answer_bytes.load(Ordering::Relaxed)
    }

    /// Waits for the caller's turn (`lanes`: one permit), unless this request holds it.
    async fn take_turn(&self, lanes: Arc<tokio::sync::Semaphore>) {
        if self.0.turn.lock().expect("turn").is_some() {
            return;
        }
        let permit = lanes.acquire_owned().await.ok();
        *self.0.turn.lock().expect("turn") = permit;
    }
}

/// The limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Costs {
    pub max_complexity: usize,
    pub max_answer_bytes: usize,
    pub heavy_complexity: usize,
}

impl ExtensionFactory for Costs {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(CostExtension {
            costs: *self,
            counting: AtomicBool::new(false),
            complexity: AtomicUsize::new(0),
            own: Spent::default(),
        })
    }
}

struct CostExtension {
    costs: Costs,
    /// Answers are counted inside `execute`: a query or mutation, or one event of a
    /// subscription (each event is executed, and counted, on its own).
    counting: AtomicBool,
    /// This operation's cost, once validated.
    complexity: AtomicUsize,
    /// This operation's own spending, when it is not part of an HTTP batch.
    own: Spent,
}

impl CostExtension {
    fn spent<'a>(&'a self, ctx: &'a ExtensionContext<'_>) -> &'a Spent {
        ctx.data_opt::<Spent>().unwrap_or(&self.own)
    }
}

fn limit_error(message: String, limit: &str) -> ServerError {
    let mut error = ServerError::new(message, None);
    let extensions = error.extensions.get_or_insert_with(Default::default);
    extensions.set("code", "BAD_USER_INPUT");
    extensions.set("limit", limit);
    error
}

/// A caller past its budget over time (see `crate::budget`).
pub(crate) fn rate_limited(over: &crate::budget::OverBudget) -> ServerError {
    let mut error = ServerError::new(over.message(), None);
    let extensions = error.extensions.get_or_insert_with(Default::default);
    extensions.set("code", "RATE_LIMITED");
    extensions.set("retryAfterSeconds", over.retry_after.as_secs().max(1));
    error
}

/// The text a resolved value adds to the answer (its leaves; objects and lists are
/// counted through their own fields, so only a list of scalars is walked, one level).
fn leaf_bytes(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len(),
        Value::List(items) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => s.len(),
                _ => 8,
            })
            .sum(),
        _ => 8,
    }
}

#[async_graphql::async_trait::async_trait]
impl Extension for CostExtension {
    /// A query or mutation, over HTTP or a socket, or one event of a subscription.
    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> Response {
        self.counting.store(true, Ordering::Relaxed);
        if ctx.data_opt::<Spent>().is_none() {
            // Not part of an HTTP batch: this one answer is all that counts. The events of
            // a subscription come through here one by one, each an answer of its own: a
            // followed log is not cut once its lines together pass the limit.
            self.own.0.answer_bytes.store(0, Ordering::Relaxed);
        }
        if self.complexity.load(Ordering::Relaxed) >= self.costs.heavy_complexity
            && let (Some(state), Some(request)) = (
                ctx.data_opt::<Arc<crate::AppState>>(),
                ctx.data_opt::<super::RequestContext>(),
            )
        {
            let lanes = state.heavy.of(request.caller());
            self.spent(ctx).take_turn(lanes).await;
            // Resolving a big answer polls for long without yielding: the worker thread
            // hands its other tasks to a new one first, so they are not kept waiting.
            let runtime = tokio::runtime::Handle::current();
            if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
                return tokio::task::block_in_place(|| {
                    runtime.block_on(next.run(ctx, operation_name))
                });
            }
        }
        next.run(ctx, operation_name).await
    }

    async fn validation(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextValidation<'_>,
    ) -> Result<ValidationResult, Vec<ServerError>> {
        let result = next.run(ctx).await?;
        self.complexity.store(result.complexity, Ordering::Relaxed);
        let total = self
            .spent(ctx)
            .0
            .complexity
            .fetch_add(result.complexity, Ordering::Relaxed)
            + result.complexity;
        if total > self.costs.max_complexity {
            return Err(vec![limit_error(
                format!(
                    "the batch is too complex: its operations cost {total}, at most {} is allowed",
                    self.costs.max_complexity
                ),
                "query_max_complexity",
            )]);
        }
        // The caller's budget over time pays for the operation before it runs.
        if let (Some(state), Some(request)) = (
            ctx.data_opt::<Arc<crate::AppState>>(),
            ctx.data_opt::<super::RequestContext>(),
        ) && let Err(over) = state.budget.spend(request.caller(), result.complexity)
        {
            return Err(vec![rate_limited(&over)]);
        }
        Ok(result)
    }

    async fn resolve(
        &self,
        ctx: &ExtensionContext<'_>,
        info: ResolveInfo<'_>,
        next: NextResolve<'_>,
    ) -> ServerResult<Option<Value>> {
        if !self.counting.load(Ordering::Relaxed) {
            return next.run(ctx, info).await;
        }
        let spent = &self.spent(ctx).0.answer_bytes;
        let too_large = || {
            limit_error(
                format!(
                    "the answer would be larger than {} bytes; ask for less",
                    self.costs.max_answer_bytes
                ),
                "query_max_answer_bytes",
            )
        };
        if spent.load(Ordering::Relaxed) > self.costs.max_answer_bytes {
            return Err(too_large());
        }
        let value = next.run(ctx, info).await?;
        let added = value.as_ref().map_or(4, leaf_bytes);
        if spent.fetch_add(added, Ordering::Relaxed) + added > self.costs.max_answer_bytes {
            return Err(too_large());
        }
        Ok(value)
    }
}

/// At most [`MAX_ERRORS`] errors, each at most [`MAX_MESSAGE`] characters; one more says
/// how many were left out.
pub fn cap_errors(response: &mut Response) {
    for error in &mut response.errors {
        if error.message.chars().count() > MAX_MESSAGE {
            error.message = error.message.chars().take(MAX_MESSAGE).collect::<String>() + "…";
        }
    }
    if response.errors.len() > MAX_ERRORS {
        let left_out = response.errors.len() - MAX_ERRORS;
        let code = response.errors[0]
            .extensions
            .as_ref()
            .and_then(|x| x.get("code").cloned());
        response.errors.truncate(MAX_ERRORS);
        let mut more = ServerError::new(format!("{left_out} more errors left out"), None);
        if let Some(code) = code {
            more.extensions
                .get_or_insert_with(Default::default)
                .set("code", code);
        }
        response.errors.push(more);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_cost_their_size_times_their_items() {
        assert_eq!(list(Some(50), 50, 3), 150);
        assert_eq!(list(None, 5_000, 2), 10_000);
        assert_eq!(
            list(Some(0), 50, 3),
            3,
            "an empty page still costs its shape"
        );
        assert_eq!(list(Some(-5), 50, 3), 3);
        assert_eq!(
            list(Some(i32::MAX), 50, usize::MAX),
            usize::MAX,
            "no overflow"
        );
    }

    #[test]
    fn errors_are_capped_in_number_and_length() {
        let mut response = Response::from_errors(
            (0..25)
                .map(|i| ServerError::new(format!("{i}: {}", "x".repeat(2_000)), None))
                .collect(),
        );
        cap_errors(&mut response);
        assert_eq!(response.errors.len(), MAX_ERRORS + 1);
        assert!(response.errors[0].message.chars().count() <= MAX_MESSAGE + 1);
        assert_eq!(
            response.errors[MAX_ERRORS].message,
            "15 more errors left out"
        );
    }
}
