//! Applying canvases: [`Canvas`] publishes a task, chain, group, chord, chunks, xmap or xstarmap as the
//! messages Celery's client sends (ids frozen first, chains upgraded, chord counters set up in the backend).

use super::*;

impl Canvas {
    /// A canvas publisher. `origin` is the publisher's node name (`gen<pid>@host` for workers and clients).
    pub fn new(
        broker: Arc<dyn Broker>,
        backend: Arc<dyn ResultBackend>,
        default_queue: impl Into<String>,
        routes: HashMap<String, String>,
        origin: impl Into<String>,
    ) -> Self {
        Self {
            broker,
            backend,
            default_queue: default_queue.into(),
            routes,
            origin: origin.into(),
            reply_to: new_id(),
            sent_events: false,
            clock: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Publishes a `task-sent` event after each task, as Celery clients do with `task_send_sent_event`.
    pub fn with_sent_events(mut self, on: bool) -> Self {
        self.sent_events = on;
        self
    }

    /// Celery's `task-sent` event for a message just published to `queue` (best effort, as Celery's).
    pub async fn sent_event(&self, msg: &TaskMessage, queue: &str) {
        use celeriac_protocol::event;
        let h = &msg.headers;
        let mut fields = serde_json::Map::new();
        for (k, v) in [
            ("uuid", json!(h.id)),
            ("root_id", json!(h.root_id)),
            ("parent_id", json!(h.parent_id)),
            ("name", json!(h.task)),
            ("args", json!(h.argsrepr)),
            ("kwargs", json!(h.kwargsrepr)),
            ("retries", json!(h.retries)),
            ("eta", json!(h.eta)),
            ("expires", json!(h.expires)),
            ("queue", json!(queue)),
            ("exchange", json!("")),
            ("routing_key", json!(queue)),
        ] {
            fields.insert(k.into(), v);
        }
        let header = event::EventHeader {
            hostname: &self.origin,
            utcoffset: 0.0,
            pid: std::process::id(),
            clock: self
                .clock
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1,
            timestamp: chrono::Utc::now().timestamp_micros() as f64 / 1e6,
        };
        let body = event::body(&header, event::EventKind::TaskSent, &fields);
        let rk = event::EventKind::TaskSent.routing_key().to_string();
        let envelope = event::envelope(&body, &self.origin, &rk, &new_id());
        if let Err(e) = self.broker.publish_events(&[(rk, envelope)]).await {
            tracing::debug!(error = %e, "publishing a task-sent event failed");
        }
    }

    /// Applies a signature dict, `args` prepended to mutable signatures (a parent's result).
    pub async fn apply(
        &self,
        sig: &Value,
        args: &[Value],
        opts: ApplyOptions,
    ) -> Result<Applied, CanvasError> {
        let mut sig = sig.clone();
        freeze(&mut sig);
        self.apply_frozen(&sig, args, opts).await
    }

    fn apply_frozen<'a>(
        &'a self,
        sig: &'a Value,
        args: &'a [Value],
        opts: ApplyOptions,
    ) -> futures::future::BoxFuture<'a, Result<Applied, CanvasError>> {
        Box::pin(async move {
            let s = parse(sig)?;
            match s.subtask_type.as_deref() {
                None | Some("xmap") | Some("xstarmap") => self.apply_task(&s, args, opts).await,
                Some("chain") => self.apply_chain(&s, args, opts).await,
                Some("group") => self.apply_group(&s, args, opts).await,
                Some("chord") => self.apply_chord(&s, args, opts).await,
                Some("chunks") => {
                    // Celery's chunks: a group of starmaps over slices of the iterable.
                    let task = s.kwargs.get("task").cloned().unwrap_or(Value::Null);
                    let items = s
                        .kwargs
                        .get("it")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    let n = s
                        .kwargs
                        .get("n")
                        .and_then(Value::as_u64)
                        .unwrap_or(1)
                        .max(1) as usize;
                    let members = items
                        .chunks(n)
                        .map(|c| {
                            canvas_sig("celery.starmap", "xstarmap", json!({"task": task, "it": c}))
                        })
                        .collect();
                    let mut g = group(members);
                    g["options"] = json!(s.options);
                    freeze(&mut g);
                    self.apply_frozen(&g, args, opts).await
                }
                Some(other) => Err(CanvasError::Invalid(format!(
                    "unsupported canvas type {other:?}"
                ))),
            }
        })
    }

    async fn apply_task(
        &self,
        s: &Signature,
        prepend: &[Value],
        opts: ApplyOptions,
    ) -> Result<Applied, CanvasError> {
        let o = &s.options;
        let str_opt = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
        let id = str_opt("task_id").unwrap_or_else(new_id);
        let args = if s.immutable {
            s.args.clone()
        } else {
            prepend.iter().chain(&s.args).cloned().collect()
        };
        let mut msg = TaskMessage::new(&s.task, id.clone(), args, s.kwargs.clone());
        let h = &mut msg.headers;
        h.origin = Some(self.origin.clone());
        h.parent_id = opts.parent_id.clone();
        h.root_id = Some(opts.root_id.clone().unwrap_or_else(|| id.clone()));
        h.group = opts.group_id.clone().or_else(|| str_opt("group_id"));
        h.group_index = opts
            .group_index
            .or_else(|| o.get("group_index").and_then(Value::as_i64));
        h.shadow = str_opt("shadow");
        // Celery's `headers`, `argsrepr` and `kwargsrepr` publishing options.
        if let Some(Value::Object(extra)) = o.get("headers") {
            for (k, v) in extra {
                h.extra.insert(k.clone(), v.clone());
            }
        }
        if let Some(r) = str_opt("argsrepr") {
            h.argsrepr = Some(r);
        }
        if let Some(r) = str_opt("kwargsrepr") {
            h.kwargsrepr = Some(r);
        }
        let now = chrono::Utc::now();
        if let Some(c) = o.get("countdown").and_then(Value::as_f64) {
            h.eta = Some(time::isoformat(
                now + chrono::Duration::microseconds((c * 1e6) as i64),
            ));
        }
        if let Some(e) = str_opt("eta") {
            h.eta = Some(e);
        }
        match o.get("expires") {
            Some(Value::Number(n)) => {
                let secs = n.as_f64().unwrap_or_default();
                h.expires = Some(time::isoformat(
                    now + chrono::Duration::microseconds((secs * 1e6) as i64),
                ));
                msg.properties.expiration = Some(((secs.max(0.0) * 1000.0) as u64).to_string());
            }
            Some(Value::String(e)) => h.expires = Some(e.clone()),
            _ => {}
        }
        if o.contains_key("time_limit") || o.contains_key("soft_time_limit") {
            h.timelimit = [
                o.get("time_limit").cloned().unwrap_or(Value::Null),
                o.get("soft_time_limit").cloned().unwrap_or(Value::Null),
            ];
        }
        if let Some(p) = opts.priority.or_else(|| {
            o.get("priority")
                .and_then(Value::as_u64)
                .map(|p| p.min(255) as u8)
        }) {
            msg.properties.priority = p;
        }
        msg.properties.reply_to =
            Some(str_opt("reply_to").unwrap_or_else(|| self.reply_to.clone()));
        let as_list = |v: Option<&Value>| match v {
            Some(Value::Array(a)) if !a.is_empty() => Some(a.clone()),
            Some(d @ Value::Object(_)) => Some(vec![d.clone()]),
            _ => None,
        };
        msg.embed.callbacks = as_list(o.get("link"));
        msg.embed.errbacks = as_list(o.get("link_error"));
        msg.embed.chain = opts.chain.clone().or_else(|| as_list(o.get("chain")));
        msg.embed.chord = opts
            .chord
            .clone()
            .or_else(|| o.get("chord").cloned().filter(|c| !c.is_null()));
        let queue = str_opt("queue")
            .or_else(|| str_opt("routing_key"))
            .or_else(|| self.routes.get(&s.task).cloned())
            .unwrap_or_else(|| self.default_queue.clone());
        trace::inject(&mut msg.headers.extra);
        self.broker.publish(&msg, &queue).await?;
        if self.sent_events {
            self.sent_event(&msg, &queue).await;
        }
        Ok(Applied::Task(id))
    }

    async fn apply_chain(
        &self,
        s: &Signature,
        prepend: &[Value],
        opts: ApplyOptions,
    ) -> Result<Applied, CanvasError> {
        let mut tasks = upgrade_chain(tasks_of(s, "tasks")?);
        if tasks.is_empty() {
            return Err(CanvasError::Invalid("empty chain".into()));
        }
        for t in tasks.iter_mut() {
            freeze(t);
        }
        let last_id = {
            let mut last = tasks.last().cloned().expect("non-empty");
            freeze(&mut last)
        };
        let first = tasks.remove(0);
        tasks.reverse();
        let mut rest = tasks;
        if let Some(outer) = &opts.chain {
            // Applying a chain as a step of another chain: its steps come first.
            rest.splice(0..0, outer.iter().cloned());
        }
        let applied = self
            .apply_frozen(
                &first,
                prepend,
                ApplyOptions {
                    chain: (!rest.is_empty()).then_some(rest),
                    ..opts
                },
            )
            .await?;
        let _ = applied;
        Ok(Applied::Task(last_id))
    }

    async fn apply_group(
        &self,
        s: &Signature,
        prepend: &[Value],
        opts: ApplyOptions,
    ) -> Result<Applied, CanvasError> {
        let gid = s
            .options
            .get("task_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(new_id);
        let tasks = tasks_of(s, "tasks")?;
        let mut members = Vec::with_capacity(tasks.len());
        for (i, t) in tasks.iter().enumerate() {
            let member_opts = ApplyOptions {
                group_id: Some(gid.clone()),
                group_index: Some(i as i64),
                chain: None,
                ..opts.clone()
            };
            members.push(self.apply_frozen(t, prepend, member_opts).await?);
        }
        Ok(Applied::Group { id: gid, members })
    }

    async fn apply_chord(
        &self,
        s: &Signature,
        prepend: &[Value],
        opts: ApplyOptions,
    ) -> Result<Applied, CanvasError> {
        let header_sig = s.kwargs.get("header").cloned().unwrap_or(Value::Null);
        let header = tasks_of(s, "header")?;
        let gid = header_sig
            .pointer("/options/task_id")
            .and_then(Value::as_str)
            .or_else(|| s.options.get("task_id").and_then(Value::as_str))
            .map(str::to_string)
            .unwrap_or_else(new_id);
        let mut body = s
            .kwargs
            .get("body")
            .cloned()
            .ok_or_else(|| CanvasError::Invalid("chord without body".into()))?;
        let body_id = freeze(&mut body);
        body["options"]["group_id"] = json!(gid);
        if body["options"].get("reply_to").is_none() {
            body["options"]["reply_to"] = json!(self.reply_to);
        }
        if let Some(rest) = &opts.chain {
            // Steps after the chord continue from its body.
            body["options"]["chain"] = json!(rest);
        }
        if header.is_empty() {
            self.apply_frozen(
                &body,
                &[json!([])],
                ApplyOptions {
                    chain: None,
                    ..opts
                },
            )
            .await?;
            return Ok(Applied::Task(body_id));
        }
        let n = header.len();
        for (i, t) in header.iter().enumerate() {
            if i + 1 == n {
                // 5.7 clients record the header size just before the last header task.
                self.backend.set_chord_size(&gid, n).await?;
            }
            let member_opts = ApplyOptions {
                group_id: Some(gid.clone()),
                group_index: Some(i as i64),
                chord: Some(body.clone()),
                chain: None,
                ..opts.clone()
            };
            self.apply_frozen(t, prepend, member_opts).await?;
        }
        Ok(Applied::Task(body_id))
    }
}
