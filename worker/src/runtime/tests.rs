//! Unit tests of the runtime's pieces (time limits, rate limits, ETA timers) under paused time.

use super::*;

async fn sleeper(secs: u64, cancel: CancellationToken) -> Result<Value, TaskError> {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(secs)) => Ok(json!("finished")),
        _ = cancel.cancelled() => Ok(json!("cleaned up")),
    }
}

#[tokio::test(start_paused = true)]
async fn soft_limit_signals_the_task_which_may_return() {
    let cancel = CancellationToken::new();
    let t0 = tokio::time::Instant::now();
    let r = with_time_limits(sleeper(100, cancel.clone()), Some(10.0), Some(2.0), &cancel).await;
    assert_eq!(r.unwrap(), json!("cleaned up"));
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn hard_limit_abandons_the_task() {
    let cancel = CancellationToken::new();
    let ignores_cancel = async {
        tokio::time::sleep(Duration::from_secs(100)).await;
        Ok(json!("too late"))
    };
    let t0 = tokio::time::Instant::now();
    let r = with_time_limits(ignores_cancel, Some(3.0), Some(1.0), &cancel).await;
    assert_eq!(t0.elapsed(), Duration::from_secs(3));
    assert!(cancel.is_cancelled());
    let Err(TaskError::Failed(e)) = r else {
        panic!("{r:?}")
    };
    assert_eq!(
        (e.exc_type.as_str(), e.exc_module.as_deref(), e.exc_message),
        (
            "TimeLimitExceeded",
            Some("billiard.exceptions"),
            vec![json!(3.0)]
        )
    );
}

#[tokio::test(start_paused = true)]
async fn no_limits_no_timers() {
    let cancel = CancellationToken::new();
    let r = with_time_limits(sleeper(50, cancel.clone()), None, None, &cancel).await;
    assert_eq!(r.unwrap(), json!("finished"));
    assert!(!cancel.is_cancelled());
}

#[test]
fn local_rate_limit_spaces_tasks() {
    let limiter = Limiter::new(
        "t",
        RateLimit {
            interval: Duration::from_millis(250),
            cluster: false,
        },
    );
    let Limiter::Local(l) = &limiter else {
        panic!()
    };
    assert!(l.check().is_ok(), "the first task runs at once");
    let wait = match l.check() {
        Err(not_until) => {
            use governor::clock::Clock;
            not_until.wait_time_from(governor::clock::DefaultClock::default().now())
        }
        Ok(()) => panic!("a second task within 250 ms must wait"),
    };
    assert!(
        wait > Duration::from_millis(200) && wait <= Duration::from_millis(250),
        "{wait:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn eta_timers_fire_in_due_order_and_shutdown_returns_the_rest() {
    let warm = CancellationToken::new();
    let mut timers = JoinSet::new();
    for (name, secs) in [("c", 30), ("a", 10), ("b", 20), ("late", 3600)] {
        timers.spawn(hold(name, Duration::from_secs(secs), warm.clone()));
    }
    let t0 = tokio::time::Instant::now();
    let mut fired = Vec::new();
    for _ in 0..3 {
        let (name, due) = timers.join_next().await.unwrap().unwrap();
        assert!(due);
        fired.push((name, t0.elapsed().as_secs()));
    }
    assert_eq!(fired, [("a", 10), ("b", 20), ("c", 30)]);
    warm.cancel();
    let (name, due) = timers.join_next().await.unwrap().unwrap();
    assert_eq!(
        (name, due),
        ("late", false),
        "a warm shutdown hands back what has not fired"
    );
    assert_eq!(t0.elapsed().as_secs(), 30);
}

#[test]
fn random_unit_is_in_range() {
    for _ in 0..1000 {
        let u = random_unit();
        assert!((0.0..1.0).contains(&u), "{u}");
    }
}
