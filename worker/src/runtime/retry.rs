//! `Task.retry`: the decoded message republished with the same id, `retries + 1` and an ETA, or the task
//! failed past `max_retries`.

use super::*;

/// Celery's `Task.retry`: past `max_retries` the task fails with its exception (or
/// `MaxRetriesExceededError`); otherwise the message is republished with the same id, `retries + 1`, an ETA
/// and this task as parent, routed back to the queue it came from. The retry is returned unchanged when it
/// was published, so the caller stores RETRY.
pub(super) async fn retry(
    shared: &Shared,
    job: &Job,
    countdown: Option<f64>,
    eta: Option<chrono::DateTime<chrono::Utc>>,
    exc: Option<ExceptionInfo>,
    max_retries: Option<i64>,
) -> Result<Value, TaskError> {
    let o = &job.task.options;
    let h = &job.message.headers;
    let max = max_retries.or(o.max_retries).unwrap_or(3);
    if max >= 0 && h.retries + 1 > max {
        return Err(TaskError::Failed(exc.unwrap_or_else(|| {
            ExceptionInfo::new(
                "celery.exceptions",
                "MaxRetriesExceededError",
                format!(
                    "Can't retry {}[{}] args:{} kwargs:{}",
                    h.task,
                    h.id,
                    h.argsrepr.as_deref().unwrap_or("()"),
                    h.kwargsrepr.as_deref().unwrap_or("{}")
                ),
            )
        })));
    }
    let delay = countdown.unwrap_or_else(|| o.default_retry_delay.unwrap_or(180.0));
    let when = eta.unwrap_or_else(|| {
        chrono::Utc::now() + chrono::Duration::microseconds((delay * 1e6) as i64)
    });
    let republish = async {
        // The decoded message, never `held.raw` again: over RabbitMQ the raw bytes are the body alone (its
        // headers are in the AMQP header table), so re-parsing them as a kombu envelope failed every retry.
        let mut msg = job.message.clone();
        msg.headers.retries += 1;
        msg.headers.eta = Some(time::isoformat(when));
        msg.headers.parent_id = Some(msg.headers.id.clone());
        msg.headers.extra.shift_remove("redelivered");
        celeriac_canvas::trace::inject(&mut msg.headers.extra);
        shared
            .broker
            .publish(&msg, &job.held.routing_key)
            .await
            .map_err(|e| e.to_string())
    };
    match republish.await {
        Ok(()) => Err(TaskError::Retry {
            countdown: Some(delay),
            eta: Some(when),
            exc,
            max_retries,
        }),
        Err(e) => {
            // As Celery: a retry that cannot be published fails the task.
            error!(task = %h.task, id = %h.id, error = %e, "publishing the retry failed");
            Err(TaskError::Failed(exc.unwrap_or_else(|| {
                ExceptionInfo::new("celery.exceptions", "Reject", e)
            })))
        }
    }
}
