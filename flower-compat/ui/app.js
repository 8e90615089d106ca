// celeriac flower UI: a small single-page app on top of Flower 2.2's HTTP API (no framework, no build step).
//
// Pages (routed on location.pathname, navigation through history.pushState):
//   / and /workers   the workers dashboard (/workers?json=1, refreshed every 2 s)
//   /tasks           the task list (/api/tasks with state, task name, worker and search filters; paginated)
//   /task/<id>       one task (/api/task/info/<id> and /api/task/result/<id>), with Revoke and Revoke & terminate
//   /queues          queue lengths (/api/queues/length, refreshed every 2 s)
//
// Every element a test or a person may look for has a stable id or data-testid. Data is always inserted as
// text (textContent), never as HTML.
(function () {
  'use strict';

  // Celery's ready states: nothing happens to such a task any more.
  const READY_STATES = new Set(['SUCCESS', 'FAILURE', 'REVOKED', 'REJECTED']);
  const ALL_STATES = ['PENDING', 'RECEIVED', 'STARTED', 'SUCCESS', 'FAILURE', 'RETRY', 'REVOKED', 'REJECTED'];
  const PAGE_SIZES = [10, 20, 50, 100];
  const REFRESH_MS = 2000;

  // ------------------------------------------------------------------ helpers
  /** An element: h('a', {href: '/x', class: 'y'}, 'text', child, [more]). Strings become text nodes. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'class') el.className = value;
      else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? '' : String(value));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  const dash = '—';

  /** Unix seconds as an ISO 8601 date (UTC), or a dash. */
  function isoDate(ts) {
    if (ts === null || ts === undefined || ts === '') return null;
    const d = new Date(Number(ts) * 1000);
    return Number.isNaN(d.getTime()) ? String(ts) : d.toISOString();
  }

  function timeEl(ts) {
    const iso = isoDate(ts);
    return iso ? h('time', { datetime: iso }, iso) : dash;
  }

  function runtime(seconds) {
    if (seconds === null || seconds === undefined) return dash;
    const s = Number(seconds);
    if (s < 0.001) return `${(s * 1e6).toFixed(0)} µs`;
    if (s < 1) return `${(s * 1000).toFixed(1)} ms`;
    return `${s.toFixed(3)} s`;
  }

  function text(value) {
    return value === null || value === undefined || value === '' ? dash : String(value);
  }

  function stateBadge(state, attrs) {
    const s = state || 'UNKNOWN';
    return h('span', Object.assign({ class: `badge state state-${s.toLowerCase()}` }, attrs || {}), s);
  }

  function taskHref(id) {
    return `/task/${encodeURIComponent(id)}`;
  }

  function now() {
    return new Date().toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
  }

  // ---------------------------------------------------------------- the API
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  /** METHOD url → the decoded JSON body; an ApiError (with .status, 0 = unreachable) otherwise. */
  async function request(method, url) {
    let resp;
    try {
      resp = await fetch(url, {
        method,
        credentials: 'same-origin',
        headers: { Accept: 'application/json' },
        cache: 'no-store',
      });
    } catch (e) {
      throw new ApiError(0, `Cannot reach the server (${e.message}).`);
    }
    const raw = await resp.text();
    let body = raw;
    try {
      body = JSON.parse(raw);
    } catch (_) {
      // Flower answers some errors as plain text.
    }
    if (!resp.ok) {
      const detail = typeof body === 'string' ? body : JSON.stringify(body);
      throw new ApiError(resp.status, detail || `${resp.status} ${resp.statusText}`);
    }
    return body;
  }

  const banner = () => document.getElementById('error-banner');

  function clearBanner() {
    const b = banner();
    b.hidden = true;
    b.textContent = '';
    b.removeAttribute('data-kind');
  }

  /** Shows a request failure above the page; a 401 gets the explanation of how to open the API. */
  function showError(err) {
    const b = banner();
    b.replaceChildren();
    if (err instanceof ApiError && err.status === 401) {
      b.dataset.kind = 'auth';
      append(b, [
        h('strong', {}, 'The API answered 401 Unauthorized. '),
        'The pages need Flower’s API (/api/…). Start celeriac flower with ',
        h('code', {}, 'FLOWER_UNAUTHENTICATED_API=1'),
        ' (or --unauthenticated-api true), or with ',
        h('code', {}, '--basic-auth user:password'),
        ' and sign in when the browser asks.',
        err.message ? h('span', { class: 'detail' }, ` Server said: ${err.message}`) : null,
      ]);
    } else if (err instanceof ApiError && err.status === 0) {
      b.dataset.kind = 'network';
      b.textContent = err.message;
    } else {
      b.dataset.kind = 'error';
      const status = err instanceof ApiError ? `${err.status}: ` : '';
      b.textContent = `Request failed (${status}${err.message})`;
    }
    b.hidden = false;
  }

  /** Runs fn now and then every ms (never two at once); .now() runs it again at once, .stop() ends it. */
  function poller(fn, ms) {
    let timer = null;
    let stopped = false;
    let running = false;
    let again = false;
    async function tick() {
      if (stopped) return;
      if (running) {
        again = true;
        return;
      }
      clearTimeout(timer);
      running = true;
      try {
        await fn();
      } catch (e) {
        if (!stopped) showError(e);
      } finally {
        running = false;
      }
      if (stopped) return;
      if (again) {
        again = false;
        tick();
      } else if (ms) {
        timer = setTimeout(tick, ms);
      }
    }
    tick();
    return {
      now: tick,
      stop() {
        stopped = true;
        clearTimeout(timer);
      },
    };
  }

  function pageHeader(title, ...extra) {
    document.title = `${title} · celeriac flower`;
    return h('div', { class: 'page-header' }, h('h1', { id: 'page-title', tabindex: '-1' }, title), extra);
  }

  // ---------------------------------------------------------------- workers
  const WORKER_COLUMNS = [
    { key: 'hostname', label: 'Worker' },
    { key: 'status', label: 'Status' },
    { key: 'active', label: 'Active', num: true, get: (w) => w.active || 0 },
    // As Flower's dashboard: Processed / Failed / Succeeded / Retried count the task events seen from the worker.
    { key: 'processed', label: 'Processed', num: true, get: (w) => w['task-received'] || 0 },
    { key: 'failed', label: 'Failed', num: true, get: (w) => w['task-failed'] || 0 },
    { key: 'succeeded', label: 'Succeeded', num: true, get: (w) => w['task-succeeded'] || 0 },
    { key: 'retried', label: 'Retried', num: true, get: (w) => w['task-retried'] || 0 },
    { key: 'loadavg', label: 'Load average' },
  ];

  function workersView(app) {
    const updated = h('p', { class: 'muted', id: 'workers-updated', 'data-testid': 'workers-updated' }, 'Loading…');
    const tbody = h('tbody', { id: 'workers-body' });
    const tfoot = h('tfoot', { id: 'workers-totals' });
    const table = h('table', { id: 'workers-table', 'data-testid': 'workers-table', class: 'grid', 'aria-busy': 'true' },
      h('caption', {}, 'Workers, from their events (refreshed every 2 seconds)'),
      h('thead', {}, h('tr', {}, WORKER_COLUMNS.map((c) => h('th', { scope: 'col', class: c.num ? 'num' : null }, c.label)))),
      tbody, tfoot);
    app.append(pageHeader('Workers', updated), h('div', { class: 'table-wrap' }, table));

    function row(w) {
      const online = w.status === true;
      const cells = WORKER_COLUMNS.map((c) => {
        let content;
        if (c.key === 'hostname') {
          content = h('a', { href: `/tasks?worker=${encodeURIComponent(w.hostname)}`, title: `Tasks of ${w.hostname}` }, w.hostname);
        } else if (c.key === 'status') {
          content = h('span', { class: `badge ${online ? 'online' : 'offline'}`, 'data-testid': 'worker-status' },
            online ? 'Online' : 'Offline');
        } else if (c.key === 'loadavg') {
          content = Array.isArray(w.loadavg) && w.loadavg.length
            ? w.loadavg.map((x) => Number(x).toFixed(2)).join(', ') : dash;
        } else {
          content = String(c.get(w));
        }
        const attrs = { 'data-col': c.key, class: c.num ? 'num' : null };
        return c.key === 'hostname' ? h('th', Object.assign({ scope: 'row' }, attrs), content) : h('td', attrs, content);
      });
      const title = [w.sw_ident, w.sw_ver, w.sw_sys].filter(Boolean).join(' ');
      return h('tr', { 'data-worker': w.hostname, 'data-status': online ? 'online' : 'offline', title: title || null }, cells);
    }

    function render(workers) {
      workers.sort((a, b) => String(a.hostname).localeCompare(String(b.hostname)));
      if (!workers.length) {
        tbody.replaceChildren(h('tr', { class: 'empty' }, h('td', { colspan: WORKER_COLUMNS.length },
          'No workers seen yet: a worker shows up here with its first event (heartbeat).')));
      } else {
        tbody.replaceChildren(...workers.map(row));
      }
      const online = workers.filter((w) => w.status === true).length;
      const totals = WORKER_COLUMNS.map((c) => {
        if (c.key === 'hostname') return h('th', { scope: 'row', 'data-col': c.key }, `Total (${workers.length})`);
        if (c.key === 'status') return h('td', { 'data-col': c.key }, `${online} online`);
        if (!c.num) return h('td', { 'data-col': c.key });
        return h('td', { 'data-col': c.key, class: 'num' }, String(workers.reduce((n, w) => n + Number(c.get(w)), 0)));
      });
      tfoot.replaceChildren(h('tr', { 'data-testid': 'workers-total' }, totals));
    }

    const p = poller(async () => {
      const body = await request('GET', '/workers?json=1');
      render(Array.isArray(body.data) ? body.data : []);
      table.setAttribute('aria-busy', 'false');
      updated.textContent = `Updated ${now()}`;
      clearBanner();
    }, REFRESH_MS);
    return () => p.stop();
  }

  // ------------------------------------------------------------------ tasks
  const TASK_COLUMNS = [
    { key: 'name', label: 'Name' },
    { key: 'uuid', label: 'UUID' },
    { key: 'state', label: 'State' },
    { key: 'args', label: 'Args' },
    { key: 'kwargs', label: 'Kwargs' },
    { key: 'result', label: 'Result' },
    { key: 'received', label: 'Received' },
    { key: 'started', label: 'Started' },
    { key: 'runtime', label: 'Runtime', num: true },
    { key: 'worker', label: 'Worker' },
  ];

  function tasksView(app) {
    const params = new URLSearchParams(location.search);
    const limit = Number(params.get('limit'));
    const q = {
      state: params.get('state') || '',
      taskname: params.get('taskname') || params.get('name') || '',
      worker: params.get('worker') || params.get('workername') || '',
      search: params.get('search') || '',
      offset: Math.max(0, Number(params.get('offset')) || 0),
      // Any page size up to 1000 from the URL (?limit=); the menu offers the usual ones.
      limit: Number.isInteger(limit) && limit > 0 && limit <= 1000 ? limit : 20,
    };

    const select = (id, label, options, value, testid) => {
      const el = h('select', { id, name: id.replace('filter-', ''), 'data-testid': testid },
        options.map(([v, l]) => h('option', { value: v, selected: v === value }, l)));
      return [el, h('div', { class: 'field' }, h('label', { for: id }, label), el)];
    };
    const [stateSel, stateField] = select('filter-state', 'State',
      [['', 'Any state'], ...ALL_STATES.map((s) => [s, s])], q.state, 'filter-state');
    const [nameSel, nameField] = select('filter-taskname', 'Task name', [['', 'Any task']], q.taskname, 'filter-taskname');
    const [workerSel, workerField] = select('filter-worker', 'Worker', [['', 'Any worker']], q.worker, 'filter-worker');
    const [limitSel, limitField] = select('filter-limit', 'Per page',
      [...new Set([...PAGE_SIZES, q.limit])].sort((a, b) => a - b).map((n) => [String(n), String(n)]),
      String(q.limit), 'filter-limit');
    const searchInput = h('input', {
      id: 'filter-search', name: 'search', type: 'search', value: q.search, 'data-testid': 'filter-search',
      placeholder: 'id, name, args, result… or key:value', autocomplete: 'off',
    });
    const refreshBtn = h('button', { type: 'button', id: 'tasks-refresh', 'data-testid': 'tasks-refresh' }, 'Refresh');
    const form = h('form', { id: 'task-filters', role: 'search', 'aria-label': 'Filter tasks', class: 'filters' },
      stateField, nameField, workerField,
      h('div', { class: 'field grow' }, h('label', { for: 'filter-search' }, 'Search'), searchInput),
      limitField,
      h('div', { class: 'field buttons' }, h('button', { type: 'submit', id: 'tasks-search' }, 'Search'), refreshBtn));

    const status = h('p', { id: 'tasks-status', role: 'status', 'data-testid': 'tasks-status', class: 'muted' }, 'Loading…');
    const tbody = h('tbody', { id: 'tasks-body' });
    const table = h('table', { id: 'tasks-table', 'data-testid': 'tasks-table', class: 'grid tasks', 'aria-busy': 'true' },
      h('caption', {}, 'Tasks, most recently received first'),
      h('thead', {}, h('tr', {}, TASK_COLUMNS.map((c) => h('th', { scope: 'col', class: c.num ? 'num' : null }, c.label)))),
      tbody);
    const prev = h('button', { type: 'button', id: 'tasks-prev', 'data-testid': 'tasks-prev', disabled: true }, '← Newer');
    const next = h('button', { type: 'button', id: 'tasks-next', 'data-testid': 'tasks-next', disabled: true }, 'Older →');
    const range = h('span', { id: 'tasks-range', 'data-testid': 'tasks-range' });
    const pager = h('nav', { class: 'pager', 'aria-label': 'Pages of tasks' }, prev, range, next);

    app.append(pageHeader('Tasks'), form, status, h('div', { class: 'table-wrap' }, table), pager);

    function fillSelect(sel, values, current, anyLabel) {
      const all = [...new Set([...values, ...(current ? [current] : [])])].sort();
      sel.replaceChildren(h('option', { value: '' }, anyLabel),
        ...all.map((v) => h('option', { value: v, selected: v === current }, v)));
      sel.value = current;
    }

    async function loadChoices() {
      const [types, workers] = await Promise.allSettled([
        request('GET', '/api/task/types'),
        request('GET', '/api/workers?status=1'),
      ]);
      if (types.status === 'fulfilled') fillSelect(nameSel, types.value['task-types'] || [], q.taskname, 'Any task');
      if (workers.status === 'fulfilled') fillSelect(workerSel, Object.keys(workers.value || {}), q.worker, 'Any worker');
    }

    function apiQuery() {
      const p = new URLSearchParams({ limit: String(q.limit + 1), offset: String(q.offset), sort_by: '-received' });
      if (q.state) p.set('state', q.state);
      if (q.taskname) p.set('taskname', q.taskname);
      if (q.worker) p.set('workername', q.worker);
      if (q.search) p.set('search', q.search);
      return p.toString();
    }

    function syncUrl() {
      const p = new URLSearchParams();
      for (const key of ['state', 'taskname', 'worker', 'search']) if (q[key]) p.set(key, q[key]);
      if (q.offset) p.set('offset', String(q.offset));
      if (q.limit !== 20) p.set('limit', String(q.limit));
      const url = `/tasks${p.toString() ? `?${p}` : ''}`;
      if (url !== location.pathname + location.search) history.replaceState(null, '', url);
    }

    function row(t) {
      const cells = TASK_COLUMNS.map((c) => {
        const v = t[c.key];
        let content;
        if (c.key === 'uuid') content = h('a', { href: taskHref(t.uuid), 'data-testid': 'task-link', class: 'mono' }, t.uuid);
        else if (c.key === 'state') content = stateBadge(v);
        else if (c.key === 'received' || c.key === 'started') content = timeEl(v);
        else if (c.key === 'runtime') content = runtime(v);
        else if (c.key === 'result' && t.state === 'FAILURE') content = text(t.exception);
        else content = text(v);
        const clip = ['args', 'kwargs', 'result'].includes(c.key);
        return h('td', {
          'data-col': c.key,
          class: c.num ? 'num' : (clip ? 'mono clip' : null),
          title: clip && typeof content === 'string' && content !== dash ? content : null,
        }, content);
      });
      return h('tr', { 'data-task-id': t.uuid, 'data-state': t.state }, cells);
    }

    let seq = 0;
    async function load() {
      const mine = ++seq;
      const query = apiQuery();
      table.setAttribute('aria-busy', 'true');
      syncUrl();
      const body = await request('GET', `/api/tasks?${query}`);
      if (mine !== seq) return; // a newer query is under way
      const tasks = Object.values(body || {});
      const more = tasks.length > q.limit;
      const shown = tasks.slice(0, q.limit);
      if (shown.length) tbody.replaceChildren(...shown.map(row));
      else tbody.replaceChildren(h('tr', { class: 'empty' }, h('td', { colspan: TASK_COLUMNS.length }, 'No tasks match.')));
      const first = shown.length ? q.offset + 1 : q.offset;
      range.textContent = shown.length ? `${first}–${q.offset + shown.length}` : '0';
      status.textContent = shown.length
        ? `Tasks ${first}–${q.offset + shown.length}${more ? ' (more on the next page)' : ''}`
        : (q.offset ? 'No tasks on this page.' : 'No tasks match these filters.');
      prev.disabled = q.offset === 0;
      next.disabled = !more;
      table.dataset.query = query;
      table.setAttribute('aria-busy', 'false');
      clearBanner();
    }

    const run = () => load().catch((e) => {
      table.setAttribute('aria-busy', 'false');
      status.textContent = 'The tasks could not be loaded.';
      showError(e);
    });

    function changed() {
      q.state = stateSel.value;
      q.taskname = nameSel.value;
      q.worker = workerSel.value;
      q.search = searchInput.value.trim();
      q.limit = Number(limitSel.value) || 20;
      q.offset = 0;
      run();
    }

    let debounce = null;
    for (const sel of [stateSel, nameSel, workerSel, limitSel]) sel.addEventListener('change', changed);
    searchInput.addEventListener('input', () => {
      clearTimeout(debounce);
      debounce = setTimeout(changed, 350);
    });
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      clearTimeout(debounce);
      changed();
    });
    refreshBtn.addEventListener('click', () => {
      loadChoices().catch(() => {});
      run();
    });
    prev.addEventListener('click', () => {
      q.offset = Math.max(0, q.offset - q.limit);
      run();
    });
    next.addEventListener('click', () => {
      q.offset += q.limit;
      run();
    });

    loadChoices().catch(() => {});
    run();
    return () => {
      clearTimeout(debounce);
      seq += 1;
    };
  }

  // ------------------------------------------------------------------- task
  const TIME_FIELDS = ['sent', 'received', 'started', 'succeeded', 'failed', 'retried', 'revoked', 'rejected', 'timestamp'];
  const INFO_FIELDS = [
    ['uuid', 'UUID'], ['name', 'Name'], ['state', 'State (events)'], ['result-state', 'Stored result state'],
    ['worker', 'Worker'], ['client', 'Client'], ['retries', 'Retries'], ['runtime', 'Runtime'],
    ['eta', 'ETA'], ['expires', 'Expires'], ['exchange', 'Exchange'], ['routing_key', 'Routing key'],
    ['clock', 'Clock'], ['root_id', 'Root'], ['parent_id', 'Parent'], ['children', 'Children'],
  ];
  const BLOCK_FIELDS = [['args', 'Args'], ['kwargs', 'Kwargs'], ['result', 'Result'], ['exception', 'Exception'], ['traceback', 'Traceback']];

  function taskView(app, id) {
    const stateHolder = h('span', { id: 'task-state-holder' });
    const note = h('p', { id: 'task-state-note', class: 'muted', hidden: true });
    const revokeBtn = h('button', { type: 'button', id: 'revoke-button', 'data-testid': 'revoke-button', disabled: true }, 'Revoke');
    const terminateBtn = h('button', {
      type: 'button', id: 'revoke-terminate-button', 'data-testid': 'revoke-terminate-button', class: 'danger', disabled: true,
    }, 'Revoke & terminate');
    const message = h('p', { id: 'action-message', 'data-testid': 'action-message', role: 'status' });
    const missing = h('p', { id: 'task-not-found', 'data-testid': 'task-not-found', class: 'notice', hidden: true });

    const dl = h('dl', { id: 'task-fields', class: 'fields' });
    const dd = {};
    for (const [key, label] of INFO_FIELDS) {
      dd[key] = h('dd', { id: `task-${key}`, 'data-field': key }, dash);
      dl.append(h('dt', {}, label), dd[key]);
    }
    const times = h('dl', { id: 'task-times', class: 'fields' });
    for (const key of TIME_FIELDS) {
      dd[key] = h('dd', { id: `task-${key}`, 'data-field': key }, dash);
      times.append(h('dt', {}, key[0].toUpperCase() + key.slice(1)), dd[key]);
    }
    const blocks = BLOCK_FIELDS.map(([key, label]) => {
      dd[key] = h('pre', { id: `task-${key}`, 'data-field': key, tabindex: '0', 'aria-labelledby': `task-${key}-label` }, dash);
      return h('section', { class: `block block-${key}` }, h('h3', { id: `task-${key}-label` }, label), dd[key]);
    });

    app.append(
      h('p', { class: 'crumbs' }, h('a', { href: '/tasks' }, '← Tasks')),
      pageHeader('Task', h('code', { id: 'task-id', class: 'mono' }, id), stateHolder),
      note, missing,
      h('div', { class: 'actions', role: 'group', 'aria-label': 'Task actions' }, revokeBtn, terminateBtn),
      message,
      h('div', { class: 'detail-grid' },
        h('section', { 'aria-labelledby': 'task-overview-title' }, h('h2', { id: 'task-overview-title' }, 'Overview'), dl),
        h('section', { 'aria-labelledby': 'task-times-title' }, h('h2', { id: 'task-times-title' }, 'Timeline (UTC)'), times)),
      h('section', { class: 'blocks', 'aria-labelledby': 'task-data-title' }, h('h2', { id: 'task-data-title' }, 'Data'), blocks),
    );
    document.title = `Task ${id} · celeriac flower`;

    let effective = null;
    let busy = false;

    function link(taskId) {
      return taskId ? h('a', { href: taskHref(taskId), class: 'mono' }, taskId) : dash;
    }

    function render(info, stored) {
      const storedState = stored && stored.state;
      const eventState = info ? info.state : null;
      // The stored result is final: a revoked ETA task is REVOKED in the result backend at once, while its
      // task-revoked event only comes when it is due. Show the later of the two.
      effective = eventState;
      if (storedState && READY_STATES.has(storedState) && !READY_STATES.has(eventState || '')) effective = storedState;
      if (!effective) effective = storedState && storedState !== 'PENDING' ? storedState : null;
      stateHolder.replaceChildren(effective ? stateBadge(effective, { id: 'task-state', 'data-testid': 'task-state' })
        : h('span', { id: 'task-state', 'data-testid': 'task-state', class: 'badge' }, 'UNKNOWN'));
      if (effective && eventState && effective !== eventState) {
        note.hidden = false;
        note.textContent = `The result backend says ${effective}; the last event from the worker says ${eventState}.`;
      } else {
        note.hidden = true;
      }
      missing.hidden = Boolean(info);
      missing.textContent = info ? '' : (storedState && storedState !== 'PENDING'
        ? 'No event of this task has been seen; its state comes from the result backend.'
        : `Unknown task '${id}': no event of it has been seen (yet).`);

      const t = info || {};
      for (const [key] of INFO_FIELDS) {
        let content;
        if (key === 'state') content = eventState ? stateBadge(eventState) : dash;
        else if (key === 'result-state') content = storedState ? stateBadge(storedState) : dash;
        else if (key === 'worker') content = t.worker ? h('a', { href: `/tasks?worker=${encodeURIComponent(t.worker)}` }, t.worker) : dash;
        else if (key === 'runtime') content = runtime(t.runtime);
        else if (key === 'root_id' || key === 'parent_id') content = link(t[key]);
        else if (key === 'children') {
          const kids = Array.isArray(t.children) ? t.children : [];
          content = kids.length ? h('ul', { id: 'task-children-list', class: 'plain' }, kids.map((c) => h('li', {}, link(c)))) : dash;
        } else if (key === 'uuid') content = h('span', { class: 'mono' }, t.uuid || id);
        else content = text(t[key]);
        dd[key].replaceChildren(content);
      }
      for (const key of TIME_FIELDS) dd[key].replaceChildren(timeEl(t[key]));
      for (const [key] of BLOCK_FIELDS) {
        let v = t[key];
        if (key === 'result' && (v === null || v === undefined) && stored && 'result' in stored && stored.state === 'SUCCESS') {
          v = typeof stored.result === 'string' ? stored.result : JSON.stringify(stored.result);
        }
        if (key === 'traceback' && !v && stored && stored.traceback) v = stored.traceback;
        dd[key].textContent = text(v);
        dd[key].closest('section').classList.toggle('empty', v === null || v === undefined || v === '');
      }
      const done = effective && READY_STATES.has(effective);
      // A task no event has been seen of yet (still waiting in its queue) can be revoked too.
      revokeBtn.disabled = busy || Boolean(done);
      terminateBtn.disabled = busy || Boolean(done);
      const title = `${t.name || 'Task'} ${id}`;
      document.title = `${title} · celeriac flower`;
    }

    async function load() {
      const [info, stored] = await Promise.allSettled([
        request('GET', `/api/task/info/${encodeURIComponent(id)}`),
        request('GET', `/api/task/result/${encodeURIComponent(id)}`),
      ]);
      // The stored result only completes the picture (the result backend may be disabled): its failure is
      // not the page's.
      if (info.status === 'rejected' && info.reason.status !== 404) throw info.reason;
      render(info.status === 'fulfilled' ? info.value : null, stored.status === 'fulfilled' ? stored.value : null);
      clearBanner();
    }

    const p = poller(load, REFRESH_MS);

    async function revoke(terminate) {
      busy = true;
      revokeBtn.disabled = true;
      terminateBtn.disabled = true;
      message.className = '';
      message.textContent = terminate ? 'Revoking and terminating…' : 'Revoking…';
      try {
        const url = `/api/task/revoke/${encodeURIComponent(id)}${terminate ? '?terminate=true' : ''}`;
        const body = await request('POST', url);
        message.className = 'ok';
        message.textContent = (body && body.message) || 'Revoked.';
      } catch (e) {
        message.className = 'error';
        message.textContent = e.status === 401 ? 'Not allowed: the API needs authentication.' : `Revoke failed: ${e.message}`;
        if (e.status === 401) showError(e);
      } finally {
        busy = false;
        p.now();
      }
    }
    revokeBtn.addEventListener('click', () => revoke(false));
    terminateBtn.addEventListener('click', () => revoke(true));
    return () => p.stop();
  }

  // ----------------------------------------------------------------- queues
  function queuesView(app) {
    const updated = h('p', { class: 'muted', id: 'queues-updated' }, 'Loading…');
    const ask = h('button', { type: 'button', id: 'queues-refresh', 'data-testid': 'queues-refresh' }, 'Ask the workers again');
    const tbody = h('tbody', { id: 'queues-body' });
    const table = h('table', { id: 'queues-table', 'data-testid': 'queues-table', class: 'grid', 'aria-busy': 'true' },
      h('caption', {}, 'Queues the workers consume from, with the messages waiting (refreshed every 2 seconds)'),
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Queue'), h('th', { scope: 'col', class: 'num' }, 'Messages'))),
      tbody);
    app.append(pageHeader('Queues', updated), h('div', { class: 'table-wrap' }, table), h('p', {}, ask));

    let asked = false;
    async function askWorkers() {
      asked = true;
      ask.disabled = true;
      try {
        await request('GET', '/api/workers?refresh=1');
      } finally {
        ask.disabled = false;
      }
    }

    const p = poller(async () => {
      const body = await request('GET', '/api/queues/length');
      const queues = (body && body.active_queues) || [];
      if (!queues.length && !asked) {
        // The server knows queues from the workers' `active_queues` replies: ask once, then show.
        await askWorkers();
        p.now();
        return;
      }
      tbody.replaceChildren(...(queues.length
        ? queues.map((q) => h('tr', { 'data-queue': q.name },
          h('th', { scope: 'row', 'data-col': 'name' }, q.name),
          h('td', { 'data-col': 'messages', class: 'num' }, String(q.messages))))
        : [h('tr', { class: 'empty' }, h('td', { colspan: 2 }, 'No queues known: no worker answered with its active queues.'))]));
      table.setAttribute('aria-busy', 'false');
      updated.textContent = `Updated ${now()}`;
      clearBanner();
    }, REFRESH_MS);
    ask.addEventListener('click', () => askWorkers().then(() => p.now(), showError));
    return () => p.stop();
  }

  function notFoundView(app) {
    app.append(pageHeader('Not found'), h('p', {}, 'No such page. ', h('a', { href: '/' }, 'Go to the workers.')));
  }

  // ----------------------------------------------------------------- router
  function match(path) {
    const clean = path.replace(/\/+$/, '') || '/';
    if (clean === '/' || clean === '/workers') return { name: 'workers', nav: 'workers', view: workersView };
    if (clean === '/tasks') return { name: 'tasks', nav: 'tasks', view: tasksView };
    if (clean === '/queues') return { name: 'queues', nav: 'queues', view: queuesView };
    const m = clean.match(/^\/task\/([^/]+)$/);
    if (m) return { name: 'task', nav: 'tasks', view: (app) => taskView(app, decodeURIComponent(m[1])) };
    return null;
  }

  let cleanup = null;

  function render(focus) {
    if (cleanup) cleanup();
    cleanup = null;
    clearBanner();
    const route = match(location.pathname) || { name: 'not-found', nav: null, view: notFoundView };
    const app = document.getElementById('app');
    app.replaceChildren();
    app.dataset.view = route.name;
    for (const a of document.querySelectorAll('#nav a[data-nav]')) {
      if (a.dataset.nav === route.nav) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    cleanup = route.view(app) || null;
    if (focus) {
      const title = document.getElementById('page-title');
      if (title) title.focus({ preventScroll: true });
      window.scrollTo(0, 0);
    }
  }

  function navigate(url) {
    history.pushState(null, '', url);
    render(true);
  }

  document.addEventListener('click', (e) => {
    if (e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
    const a = e.target.closest('a[href]');
    if (!a || (a.target && a.target !== '_self') || a.hasAttribute('download')) return;
    const url = new URL(a.href, location.href);
    if (url.origin !== location.origin || !match(url.pathname)) return;
    if (url.pathname === location.pathname && url.search === location.search && url.hash) return; // in-page anchor
    e.preventDefault();
    navigate(url.pathname + url.search);
  });
  window.addEventListener('popstate', () => render(true));

  // For tests and debugging: the router, and navigation without a page load.
  window.celeriacFlower = { navigate, request };

  render(false);
})();
