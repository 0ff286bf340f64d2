//! The refund agent: looks up an order, drafts a refund, and sends money only with a
//! person's approval above a threshold. A rejection's reason goes back to the agent,
//! which drafts a smaller refund or gives up.

use crate::ledger::{Ledger, LedgerEntry};
use holdpoint_engine::{Ctx, Failure, Gated, Registry, RetryPolicy, StepInfo};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Refunds at or below this go out without asking anyone.
pub const AUTO_APPROVE_CENTS: u64 = 10_000;
const MAX_DRAFTS: u32 = 3;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefundRequest {
    pub order_id: String,
    pub amount_cents: u64,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub customer: String,
    pub total_cents: u64,
}

/// The arguments of the gated `send_money` action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Payment {
    pub to: String,
    pub amount_cents: u64,
    pub memo: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum RefundOutcome {
    Refunded { payment: Payment, drafts: u32 },
    GaveUp { last_reason: String, drafts: u32 },
}

/// A stand-in order database: deterministic orders from their ids.
pub fn lookup_order(order_id: &str) -> Result<Order, Failure> {
    if order_id.is_empty() {
        return Err(Failure::terminal("empty order id"));
    }
    let total_cents = 5_000 + order_id.bytes().map(u64::from).sum::<u64>() * 1_000;
    Ok(Order {
        order_id: order_id.to_string(),
        customer: format!("customer-of-{order_id}"),
        total_cents,
    })
}

/// The workflow. Registered by [`register`].
pub async fn refund(ctx: Ctx, req: RefundRequest, ledger: Arc<Ledger>) -> Result<RefundOutcome, Failure> {
    let order_id = req.order_id.clone();
    // A read: running it again after a crash is harmless, so its start need not be
    // durable before it runs.
    let order = ctx
        .step("lookup_order", || async { lookup_order(&order_id) })
        .idempotent()
        .await?;
    let mut amount = req.amount_cents.min(order.total_cents);
    let mut last_reason = String::new();
    for draft in 1..=MAX_DRAFTS {
        let payment = Payment {
            to: order.customer.clone(),
            amount_cents: amount,
            memo: format!("refund for order {}: {}", order.order_id, req.reason),
        };
        // Once a person has rejected a draft, every later draft goes back to a person,
        // however small: the agent does not get to route around a "no".
        let approved = if amount <= AUTO_APPROVE_CENTS && last_reason.is_empty() {
            payment
        } else {
            let context = serde_json::json!({
                "order": order,
                "requested_cents": req.amount_cents,
                "draft": draft,
                "previous_rejection": (!last_reason.is_empty()).then_some(&last_reason),
            });
            match ctx.gate("send_money", payment, context).await? {
                Gated::Approved { args, .. } | Gated::Edited { args, .. } => args,
                Gated::Rejected { reason, .. } => {
                    last_reason = reason;
                    amount /= 2;
                    continue;
                }
            }
        };
        let paid = send_money(&ctx, &ledger, approved).await?;
        return Ok(RefundOutcome::Refunded {
            payment: paid,
            drafts: draft,
        });
    }
    Ok(RefundOutcome::GaveUp {
        last_reason,
        drafts: MAX_DRAFTS,
    })
}

async fn send_money(ctx: &Ctx, ledger: &Arc<Ledger>, payment: Payment) -> Result<Payment, Failure> {
    ctx.step("send_money", || {
        let payment = payment.clone();
        let ledger = ledger.clone();
        async move {
            let key = StepInfo::current()
                .map(|s| s.idempotency_key)
                .ok_or_else(|| Failure::terminal("send_money ran outside a step"))?;
            ledger.pay(LedgerEntry {
                idempotency_key: key,
                to: payment.to.clone(),
                amount_cents: payment.amount_cents,
                memo: payment.memo.clone(),
            })?;
            Ok(payment)
        }
    })
    .retry(RetryPolicy::attempts(5))
    .await
}

/// Adds the refund agent (version 1) and its action type to a registry.
pub fn register(registry: Registry, ledger: Arc<Ledger>) -> Registry {
    registry
        .workflow("refund", 1, move |ctx, req| refund(ctx, req, ledger.clone()))
        .action::<Payment>("send_money")
}
