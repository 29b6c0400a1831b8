// The operators' dashboard. No framework and no inline code (the page's CSP allows only this file);
// every value from the API reaches the page through textContent or attributes, never as markup.
(function () {
  'use strict';

  const API = '/admin/api';
  const TICK_MS = 3000; // request log and open detail; the heavier calls run every few ticks
  const STATS_MINUTES = 60;
  const SVG_NS = 'http://www.w3.org/2000/svg';

  // the request log's outcomes, in the order charts stack them
  const OUTCOMES = [
    ['booked', 'Booked'], ['rescheduled', 'Rescheduled'], ['cancelled', 'Cancelled'],
    ['replayed', 'Replayed answer'], ['queued', 'Queued'], ['held', 'Held'], ['refused', 'Refused'],
    ['unmapped', 'Unmapped'], ['unmatched', 'Unmatched'], ['conflict', 'Conflict'], ['throttled', 'Throttled'], ['rejected', 'Rejected'], ['failed', 'Failed'],
    // Health Cloud's callouts to the EHRs
    ['proposed', 'Proposed (not booked)'], ['existing', 'Already in the EHR'], ['found', 'Found'], ['partial', 'Partly found'],
  ];
  const OUTCOME_LABEL = Object.fromEntries(OUTCOMES);
  const ATTENTION = new Set(['unmapped', 'unmatched', 'refused', 'failed']);
  const PERCENTILES = [['p50', 'p50'], ['p95', 'p95'], ['p99', 'p99']];
  const CIRCUIT = {
    closed: ['Closed', 'Calls to Salesforce flow normally.'],
    half_open: ['Half-open', 'One probe call decides whether calls resume.'],
    open: ['Open', 'Salesforce is failing: bookings are queued or refused at once.'],
  };
  // Health Cloud's callouts (the second direction): every other op is a booking's
  const CALLOUT_OPS = new Set(['find', 'slot-status', 'create', 'cancel', 'read']);
  const OPS = {
    book: 'Booking', change: 'Reschedule or cancellation', replay: 'Operator replay', deliver: 'Queue delivery',
    release: 'Held booking tried again',
    find: 'Health Cloud: find slots', 'slot-status': 'Health Cloud: slot status', create: 'Health Cloud: book in the EHR',
    cancel: 'Health Cloud: cancel in the EHR', read: 'Health Cloud: read from the EHR',
  };
  const QUEUE_WHERE = { ready: 'Ready', delayed: 'Waiting to retry', dead: 'Dead letter' };
  const HELD_STATE = { held: 'Held', refused: 'Refused' };
  // why a held booking waits (or was refused): the codes the gateway gives, in words; others are
  // Salesforce's error codes, shown as they are
  const HELD_WHY = {
    'patient-unknown': 'The org does not know the patient yet.',
    'refused-by-operator': 'Refused by an operator.',
    unmatched: 'Another participant has no record in the org, or several: refused as a gap in configuration.',
    DUPLICATES_DETECTED: 'A duplicate rule matched a patient the org holds: give that patient the EHR\'s id in the org.',
    DUPLICATE_VALUE: 'Another record holds this patient\'s EHR id: give the patient the EHR\'s id in the org.',
    MULTIPLE_CHOICES: 'Several patients carry this EHR id in the org: keep one.',
    NO_FAMILY_NAME: 'The EHR gave no family name, so the patient cannot be created.',
    NO_EHR_CLIENT: 'The source has no EHR client to read the patient from.',
    NOT_IN_EHR: 'The EHR does not hold this patient.',
  };

  const state = {
    role: null,
    csrf: null,
    tab: 'activity',
    paused: false,
    timer: null,
    ticks: 0,
    sources: [],
    filters: { source: '', outcome: '', direction: '' },
    chartSource: '',
    requests: [],
    logSig: '',
    selectedId: null,
    detail: null,
    replayNotice: null,
    stats: null,
    queue: null,
    codemaps: null,
    held: null,
    heldSig: '',
    heldWho: {}, // hold -> the patient a PHI operator asked to see (each view audited); gone at sign-out
    busy: new Set(),
    gen: 0, // bumped at sign-out: answers to calls made before it are dropped
    seq: { log: 0, held: 0 },
  };

  // ---------- DOM helpers ----------

  const byId = (id) => document.querySelector('[data-testid="' + id + '"]');

  function append(node, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setProps(node, props) {
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'class') node.setAttribute('class', value);
      else if (key === 'text') node.textContent = String(value);
      else if (key === 'testid') node.setAttribute('data-testid', value);
      else if (key.startsWith('on') && typeof value === 'function') node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    return node;
  }

  function h(tag, props, ...children) {
    return append(setProps(document.createElement(tag), props), children);
  }

  function s(tag, props, ...children) {
    return append(setProps(document.createElementNS(SVG_NS, tag), props), children);
  }

  function clear(node) {
    node.replaceChildren();
    return node;
  }

  // ---------- formatting ----------

  const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });
  const dayTimeFmt = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });
  const minuteFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', hour12: false });
  const numFmt = new Intl.NumberFormat();

  // where an issue is: FHIR paths (expression), then the HTTP parts (location: http.<header or parameter>)
  function where(issue) {
    return [...(issue.expression || []), ...(issue.location || [])];
  }

  function fmtTime(ms) {
    if (typeof ms !== 'number') return '–';
    const d = new Date(ms);
    return d.toDateString() === new Date().toDateString() ? timeFmt.format(d) : dayTimeFmt.format(d);
  }

  function fmtMs(v) {
    if (typeof v !== 'number' || !isFinite(v)) return '–';
    if (v >= 1000) return (v / 1000).toFixed(v >= 10000 ? 1 : 2) + ' s';
    return (v < 10 ? v.toFixed(1) : String(Math.round(v))) + ' ms';
  }

  function timeEl(ms) {
    if (typeof ms !== 'number') return '–';
    return h('time', { datetime: new Date(ms).toISOString(), title: new Date(ms).toString() }, fmtTime(ms));
  }

  function outcomeBadge(outcome, testid) {
    const known = Object.prototype.hasOwnProperty.call(OUTCOME_LABEL, outcome);
    return h('span', { class: 'badge o-' + (known ? outcome : 'other'), 'data-outcome': outcome, testid },
      known ? OUTCOME_LABEL[outcome] : String(outcome));
  }

  const dash = () => h('span', { class: 'muted', 'aria-label': 'none' }, '—');

  // ---------- API ----------

  class ApiError extends Error {
    constructor(status, message, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  // an OperationOutcome's first issue, in words
  function outcomeText(body) {
    const issue = body && Array.isArray(body.issue) ? body.issue[0] : null;
    if (!issue) return null;
    return (issue.details && issue.details.text) || issue.diagnostics || issue.code || null;
  }

  async function api(method, path, options) {
    const opts = options || {};
    const gen = state.gen;
    const headers = { Accept: 'application/json' };
    if (method !== 'GET' && state.csrf) headers['X-CSRF-Token'] = state.csrf;
    let body;
    if (opts.json !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(opts.json);
    } else if (opts.body !== undefined) {
      headers['Content-Type'] = opts.contentType || 'application/json';
      body = opts.body;
    }
    let res;
    try {
      res = await fetch(API + path, { method, headers, body, credentials: 'same-origin', cache: 'no-store' });
    } catch (err) {
      throw new ApiError(0, 'The gateway cannot be reached.', null);
    }
    const text = res.status === 204 ? '' : await res.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (err) { data = null; }
    }
    if (gen !== state.gen) {
      const stale = new ApiError(0, 'signed out', null);
      stale.stale = true;
      throw stale;
    }
    if (!res.ok) {
      if (res.status === 401 && path !== '/session') sessionLost();
      throw new ApiError(res.status, outcomeText(data) || 'The gateway answered ' + res.status + '.', data);
    }
    return data;
  }

  const enc = encodeURIComponent;

  // one call of each kind at a time; a slow gateway is not piled on
  async function once(name, fn) {
    if (state.busy.has(name)) return;
    state.busy.add(name);
    try { await fn(); } finally { state.busy.delete(name); }
  }

  // ---------- toasts ----------

  function toast(message, kind) {
    if (!state.role) return; // nothing outlives the session
    const box = byId('toasts');
    const item = h('div', { class: 'toast toast-' + (kind || 'info'), testid: 'toast' },
      h('span', null, message),
      h('button', { type: 'button', class: 'toast-close', 'aria-label': 'Dismiss', onclick: () => item.remove() }, '×'));
    box.append(item);
    setTimeout(() => item.remove(), kind === 'error' ? 9000 : 5000);
  }

  // ---------- session ----------

  function showSignIn(message) {
    byId('dashboard').hidden = true;
    byId('session-bar').hidden = true;
    closeDetail();
    byId('signin-view').hidden = false;
    const err = byId('signin-error');
    err.hidden = !message;
    err.textContent = message || '';
    byId('admin-key').focus();
  }

  function showDashboard() {
    byId('signin-view').hidden = true;
    byId('dashboard').hidden = false;
    byId('session-bar').hidden = false;
    const role = byId('role');
    role.textContent = state.role === 'phi' ? 'Admin · PHI access' : 'Admin';
    role.className = 'role' + (state.role === 'phi' ? ' role-phi' : '');
    role.dataset.role = state.role;
    selectTab(tabFromHash(), false);
    startPolling();
    document.getElementById('tab-' + state.tab).focus();
  }

  // nothing of the last session stays on the page (the detail may have held patient data)
  function forget() {
    stopPolling();
    state.gen++;
    state.busy.clear();
    state.role = state.csrf = null;
    state.requests = [];
    state.logSig = '';
    state.detail = state.selectedId = state.replayNotice = null;
    state.stats = state.queue = state.codemaps = state.held = null;
    state.heldSig = '';
    state.heldWho = {};
    clear(byId('request-log').tBodies[0]);
    clear(byId('detail-body'));
    clear(byId('queue'));
    clear(byId('held')); // a PHI session's held bookings name their patients
    byId('held-count').hidden = true;
    disarm(byId('identity-forget'));
    clear(byId('codemaps'));
    byId('translate-input').value = '';
    resetTranslateOutput();
  }

  function sessionLost() {
    if (!state.role) return;
    forget();
    showSignIn('Your session has ended. Sign in again.');
  }

  async function signIn(event) {
    event.preventDefault();
    const input = byId('admin-key');
    const button = byId('signin-submit');
    const key = input.value.trim();
    if (!key) {
      showSignIn('Enter your admin key.');
      return;
    }
    button.disabled = true;
    button.textContent = 'Signing in…';
    try {
      const session = await api('POST', '/session', { json: { key } });
      input.value = '';
      state.role = session.role;
      state.csrf = session.csrf;
      showDashboard();
    } catch (err) {
      const message = err.status === 401 ? 'That key is not valid.'
        : err.status === 403 ? 'That key belongs to a source, not an operator. Use an admin key.'
          : err.message;
      showSignIn(message);
      input.select();
    } finally {
      button.disabled = false;
      button.textContent = 'Sign in';
    }
  }

  async function signOut() {
    try { await api('DELETE', '/session'); } catch (err) { /* the cookie is dropped either way */ }
    forget();
    showSignIn(null);
  }

  async function resume() {
    try {
      const session = await api('GET', '/session');
      state.role = session.role;
      state.csrf = session.csrf;
      showDashboard();
    } catch (err) {
      showSignIn(err.status === 401 || err.status === 403 ? null : err.message);
    }
  }

  // ---------- tabs ----------

  const TABS = ['activity', 'queue', 'held', 'codemaps'];

  function tabFromHash() {
    const name = location.hash.replace(/^#/, '');
    return TABS.includes(name) ? name : 'activity';
  }

  function selectTab(name, focus) {
    state.tab = name;
    for (const tab of document.querySelectorAll('[role="tab"]')) {
      const on = tab.dataset.tab === name;
      tab.setAttribute('aria-selected', String(on));
      tab.tabIndex = on ? 0 : -1;
      if (on && focus) tab.focus();
    }
    for (const t of TABS) byId('panel-' + t).hidden = t !== name;
    if (location.hash.replace(/^#/, '') !== name) history.replaceState(null, '', '#' + name);
    if (state.role) {
      // failures show in the live indicator at the next tick
      if (name === 'queue') once('queue', refreshQueue).catch(() => {});
      if (name === 'held') once('held', refreshHeld).catch(() => {});
      if (name === 'codemaps') once('codemaps', refreshCodemaps).catch(() => {});
      if (name === 'activity') renderStats();
    }
  }

  function onTabKey(event) {
    const i = TABS.indexOf(state.tab);
    let next = null;
    if (event.key === 'ArrowRight') next = TABS[(i + 1) % TABS.length];
    else if (event.key === 'ArrowLeft') next = TABS[(i + TABS.length - 1) % TABS.length];
    else if (event.key === 'Home') next = TABS[0];
    else if (event.key === 'End') next = TABS[TABS.length - 1];
    if (next) {
      event.preventDefault();
      selectTab(next, true);
    }
  }

  // ---------- polling ----------

  function startPolling() {
    stopPolling();
    state.ticks = 0;
    tick();
    state.timer = setInterval(tick, TICK_MS);
  }

  function stopPolling() {
    if (state.timer) clearInterval(state.timer);
    state.timer = null;
  }

  async function tick() {
    if (!state.role || state.paused || document.hidden) return;
    const n = state.ticks++;
    const jobs = [once('log', refreshLog)];
    if (n % 3 === 0) jobs.push(once('stats', refreshStats));
    if (state.tab === 'queue' || n % 5 === 0) jobs.push(once('queue', refreshQueue));
    if (state.tab === 'held' || n % 5 === 0) jobs.push(once('held', refreshHeld)); // the tab's count
    // the detail compares its maps version with the one now serving
    if (state.tab === 'codemaps' || state.detail || n % 10 === 0) jobs.push(once('codemaps', refreshCodemaps));
    if (state.detail) jobs.push(once('detail', refreshDetail));
    const results = await Promise.allSettled(jobs);
    const failed = results.find((r) => r.status === 'rejected');
    const live = byId('live');
    if (failed) {
      live.classList.add('live-down');
      byId('updated').textContent = failed.reason && failed.reason.status === 0 ? 'Connection lost' : 'Update failed';
    } else {
      live.classList.remove('live-down');
      byId('updated').textContent = 'Live · ' + timeFmt.format(new Date());
    }
  }

  function togglePause() {
    state.paused = !state.paused;
    const button = byId('pause');
    button.setAttribute('aria-pressed', String(state.paused));
    button.textContent = state.paused ? 'Resume updates' : 'Pause updates';
    byId('live').classList.toggle('live-paused', state.paused);
    if (state.paused) byId('updated').textContent = 'Paused';
    else tick();
  }

  // ---------- sources (from the code maps: one entry per configured source) ----------

  function setSources(sources) {
    if (sources.join() === state.sources.join()) return;
    state.sources = sources;
    for (const id of ['filter-source', 'chart-source']) {
      const select = byId(id);
      const keep = select.value;
      select.replaceChildren(select.options[0]);
      for (const src of sources) select.append(h('option', { value: src }, src));
      select.value = sources.includes(keep) ? keep : '';
    }
    const tsel = byId('translate-source');
    const keep = tsel.value;
    clear(tsel);
    for (const src of sources) tsel.append(h('option', { value: src }, src));
    if (sources.includes(keep)) tsel.value = keep;
  }

  // ---------- request log ----------

  async function refreshLog() {
    const seq = ++state.seq.log;
    const q = new URLSearchParams({ limit: '100' });
    if (state.filters.source) q.set('source', state.filters.source);
    if (state.filters.outcome) q.set('outcome', state.filters.outcome);
    if (state.filters.direction) q.set('direction', state.filters.direction);
    const data = await api('GET', '/requests?' + q);
    if (seq !== state.seq.log) return; // the filters changed while it was on its way
    state.requests = Array.isArray(data && data.requests) ? data.requests : [];
    renderLog();
  }

  function renderLog() {
    const list = state.requests;
    const sig = list.map((v) => [v.id, v.outcome, v.replayed_by || ''].join(':')).join('|') + '#' + state.selectedId;
    if (sig === state.logSig) return;
    state.logSig = sig;
    const tbody = byId('request-log').tBodies[0];
    const focused = document.activeElement && document.activeElement.closest ? document.activeElement.closest('tr[data-id]') : null;
    const focusId = focused && tbody.contains(focused) ? focused.dataset.id : null;
    if (!list.length) {
      const filtered = state.filters.source || state.filters.outcome || state.filters.direction;
      tbody.replaceChildren(h('tr', { class: 'empty' }, h('td', { colspan: 8 },
        filtered ? 'No requests match these filters.' : 'No requests yet. Bookings appear here as the EHRs send them.')));
    } else {
      tbody.replaceChildren(...list.map(logRow));
    }
    if (focusId) {
      const again = tbody.querySelector('tr[data-id="' + CSS.escape(focusId) + '"]');
      if (again) again.focus();
    }
    byId('log-foot').textContent = list.length
      ? 'Showing the latest ' + list.length + (list.length === 1 ? ' request' : ' requests') + ', newest first.'
      : '';
  }

  function logRow(v) {
    const selected = v.id === state.selectedId;
    const sf = v.sf_status || v.sf_id
      ? h('span', { class: 'sf' }, v.sf_status ? h('span', { class: 'code-num' }, String(v.sf_status)) : null,
        v.sf_id ? h('code', { class: 'sfid', testid: 'row-sf-id' }, v.sf_id) : null)
      : v.ehr_status ? h('span', { class: 'sf', testid: 'row-ehr', title: 'the EHR answered' },
        h('span', { class: 'code-num' }, 'EHR ' + String(v.ehr_status)), ' ', fmtMs(v.ehr_ms))
        : dash();
    const error = v.sf_error ? h('code', { class: 'err' }, v.sf_error)
      : v.ehr_error ? h('code', { class: 'err' }, v.ehr_error)
      : (v.issues && v.issues.length ? h('span', { class: 'muted nowrap' }, v.issues[0].code) : dash());
    const row = h('tr', {
      testid: 'request-row', 'data-id': v.id, 'data-outcome': v.outcome, 'data-op': v.op, tabindex: 0,
      class: selected ? 'selected' : null, 'aria-selected': String(selected),
    },
    h('td', { class: 'nowrap' }, timeEl(v.time_ms)),
    h('td', null, h('span', { class: 'src' }, v.source), v.op && v.op !== 'book' ? h('span', { class: 'tag', title: OPS[v.op] || v.op }, v.op) : null),
    h('td', null, outcomeBadge(v.outcome)),
    h('td', { class: 'num' }, h('span', { class: 'http http-' + String(v.status).charAt(0) }, String(v.status))),
    h('td', null, sf),
    h('td', null, error),
    h('td', null, v.idempotency ? h('span', { class: 'idem' }, v.idempotency) : dash()),
    h('td', { class: 'num nowrap' }, fmtMs(v.ms)));
    row.addEventListener('click', () => openDetail(v.id));
    row.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        openDetail(v.id);
      }
    });
    return row;
  }

  function onFilter() {
    state.filters.source = byId('filter-source').value;
    state.filters.outcome = byId('filter-outcome').value;
    state.filters.direction = byId('filter-direction').value;
    state.logSig = '';
    state.seq.log++; // an answer already on its way is for the old filters
    state.busy.delete('log');
    once('log', refreshLog).catch((err) => toast(err.message, 'error'));
  }

  // ---------- request detail ----------

  let returnFocus = null;

  async function openDetail(id) {
    if (state.selectedId !== id) state.replayNotice = null;
    state.selectedId = id;
    const drawer = byId('detail');
    if (drawer.hidden) returnFocus = document.activeElement;
    drawer.hidden = false;
    document.body.classList.add('has-drawer');
    byId('detail-id').textContent = id;
    if (!state.detail || state.detail.id !== id) {
      clear(byId('detail-body')).append(h('p', { class: 'muted' }, 'Loading…'));
    }
    renderLog();
    try {
      const view = await api('GET', '/requests/' + enc(id));
      if (state.selectedId !== id) return;
      state.detail = view;
      renderDetail();
      document.getElementById('detail-title').focus();
    } catch (err) {
      if (state.selectedId !== id) return;
      clear(byId('detail-body')).append(h('p', { class: 'form-error' }, err.status === 404
        ? 'This request is no longer in the log.' : err.message));
    }
  }

  async function refreshDetail() {
    const id = state.selectedId;
    if (!id || !state.detail) return;
    const view = await api('GET', '/requests/' + enc(id));
    if (state.selectedId !== id) return;
    if (JSON.stringify(view) !== JSON.stringify(state.detail)) {
      state.detail = view;
      renderDetail();
    }
  }

  function closeDetail() {
    const drawer = byId('detail');
    const wasOpen = !drawer.hidden;
    drawer.hidden = true;
    document.body.classList.remove('has-drawer');
    state.detail = state.selectedId = state.replayNotice = null;
    clear(byId('detail-body'));
    if (state.role) renderLog();
    if (wasOpen && returnFocus && document.contains(returnFocus)) returnFocus.focus();
    returnFocus = null;
  }

  function field(label, value, testid) {
    return [h('dt', null, label), h('dd', { testid }, value === null || value === undefined || value === '' ? dash() : value)];
  }

  function section(title, ...children) {
    return h('section', { class: 'd-section' }, h('h3', null, title), children);
  }

  function idButton(id, label) {
    return h('button', { type: 'button', class: 'linklike', onclick: () => openDetail(id) }, label, ' ', h('code', null, id));
  }

  function renderDetail() {
    const v = state.detail;
    const body = clear(byId('detail-body'));
    byId('detail-id').textContent = v.id;

    const notice = state.replayNotice;
    if (notice && notice.id === v.id) {
      const ok = v.outcome === 'booked' || v.outcome === 'replayed';
      body.append(h('div', { class: 'callout ' + (ok ? 'callout-ok' : 'callout-warn'), testid: 'replay-result', role: 'status' },
        h('strong', null, ok ? 'Replayed and booked.' : 'Replayed: ' + (OUTCOME_LABEL[v.outcome] || v.outcome).toLowerCase() + '.'),
        ' ', v.sf_id ? ['Salesforce id ', h('code', null, v.sf_id), '. '] : null,
        idButton(notice.original, 'Original')));
    }

    body.append(h('div', { class: 'd-status' },
      outcomeBadge(v.outcome, 'detail-outcome'),
      h('span', { class: 'http http-' + String(v.status).charAt(0) }, 'HTTP ' + v.status),
      h('span', { class: 'muted' }, OPS[v.op] || v.op || 'Booking'),
      h('span', { class: 'muted' }, '·'), timeEl(v.time_ms)));

    // whether the maps changed since this request: what an operator waits for before a replay
    const serving = state.codemaps && state.codemaps[v.source] ? state.codemaps[v.source].version : null;
    const mapsChanged = v.maps_version && serving && serving !== v.maps_version
      ? h('p', { class: 'callout callout-info', testid: 'maps-changed' }, 'The ' + v.source + ' maps have changed since: ', h('code', null, serving), ' is serving now.')
      : null;

    // the action first: the drawer may scroll past long issue lists
    if (v.replayable) {
      const button = h('button', { type: 'button', class: 'btn btn-primary', testid: 'replay' }, 'Replay booking');
      button.addEventListener('click', () => replay(v.id, button));
      body.append(h('div', { class: 'd-action' }, mapsChanged, button,
        h('p', { class: 'muted small' }, 'Sends the kept input again through the code maps serving now, with its original idempotency key.')));
    }

    // held and unmatched bookings are dealt with elsewhere: say where
    if (v.outcome === 'held') {
      body.append(h('div', { class: 'callout callout-info d-note', testid: 'detail-held' },
        h('p', null, 'Held until the org knows its patient: it is booked when the patient arrives. ' +
          'Release it now or refuse it under Held bookings.'),
        h('button', { type: 'button', class: 'btn btn-sm', onclick: () => selectTab('held', true) }, 'Open held bookings')));
    } else if (v.outcome === 'unmatched') {
      const button = h('button', { type: 'button', class: 'btn btn-sm', testid: 'detail-forget' }, 'Forget cached records');
      armConfirm(button, 'Forget cached records', 'Confirm forget', forgetIdentities);
      body.append(h('div', { class: 'callout callout-info d-note', testid: 'detail-unmatched' },
        h('p', null, 'A participant has no record in the org, or several. Once the org\'s records are fixed, ' +
          'forget the cached records so the gateway looks them up again, then replay.'),
        button));
    }

    // why: the issues, or Salesforce's error code
    const issues = Array.isArray(v.issues) ? v.issues : [];
    if (issues.length) {
      body.append(section(v.outcome === 'unmapped' ? 'Why it was not booked' : 'Issues',
        h('ul', { class: 'issues', testid: 'detail-issues' }, issues.map((issue) => h('li', { testid: 'issue', class: 'issue' },
          h('span', { class: 'issue-code' }, issue.code),
          h('p', { class: 'issue-text' }, issue.diagnostics),
          where(issue).length
            ? h('p', { class: 'issue-where' }, 'At ', where(issue).map((e, i) => [i ? ', ' : '', h('code', { testid: 'issue-path' }, e)]))
            : null)))));
    } else if (v.sf_error) {
      body.append(section('Why', h('p', null, 'Salesforce answered ', h('code', null, v.sf_error),
        v.sf_status ? ' (HTTP ' + v.sf_status + ').' : '.')));
    }

    // a callout of Health Cloud's went to an EHR, not to Salesforce: its side is the EHR's
    const callout = CALLOUT_OPS.has(v.op);
    const called = callout
      ? [field('Latency', v.ehr_ms !== undefined && v.ehr_ms !== null ? fmtMs(v.ms) + ' (EHR ' + fmtMs(v.ehr_ms) + ')' : fmtMs(v.ms)),
        field('EHR status', v.ehr_status ? String(v.ehr_status) : null, 'detail-ehr-status'),
        field('EHR error', v.ehr_error ? h('code', null, v.ehr_error) : null, 'detail-ehr-error')]
      : [field('Latency', v.sf_ms !== undefined && v.sf_ms !== null ? fmtMs(v.ms) + ' (Salesforce ' + fmtMs(v.sf_ms) + ')' : fmtMs(v.ms)),
        field('Salesforce status', v.sf_status ? String(v.sf_status) : null),
        field('Salesforce id', v.sf_id ? h('code', null, v.sf_id) : null, 'detail-sf-id'),
        field('Salesforce error', v.sf_error ? h('code', null, v.sf_error) : null)];
    body.append(section('Summary', h('dl', { class: 'dl' },
      field('Source', v.source, 'detail-source'),
      field('Received', timeEl(v.time_ms)),
      field('Idempotency', v.idempotency),
      called,
      v.suppressed ? field('Not stored', v.suppressed + ' more refused like this one since the last stored', 'detail-suppressed') : null,
      v.input_too_large ? field('Input', 'not kept: ' + v.input_too_large + ' bytes, over the request log\'s limit', 'detail-input-too-large') : null,
      v.replay_of ? field('Replay of', idButton(v.replay_of, 'Open')) : null,
      v.replayed_by ? field('Replayed by', idButton(v.replayed_by, 'Open'), 'detail-replayed-by') : null)));

    // code maps used
    const used = Array.isArray(v.maps_used) ? v.maps_used : [];
    body.append(section('Code maps',
      h('dl', { class: 'dl' }, field('Version', v.maps_version ? h('code', null, v.maps_version) : null, 'detail-maps-version')),
      v.replayable ? null : mapsChanged,
      used.length
        ? h('ul', { class: 'chips', testid: 'detail-maps-used', 'aria-label': 'Map entries used' }, used.map((m) => h('li', null, h('code', null, m))))
        : h('p', { class: 'muted small' }, 'No map entries were used.')));

    // patient data: only present for a PHI-entitled session
    if (v.patient || v.input) {
      let input = v.input;
      if (input) {
        try { input = JSON.stringify(JSON.parse(input), null, 2); } catch (err) { /* shown as received */ }
      }
      body.append(h('section', { class: 'd-section phi', testid: 'detail-phi' },
        h('h3', null, 'Patient data ', h('span', { class: 'phi-tag' }, 'PHI')),
        v.patient ? h('dl', { class: 'dl' }, field('Patient', h('code', null, v.patient))) : null,
        input ? h('details', null, h('summary', null, 'Input as received'), h('pre', { class: 'code', testid: 'detail-input' }, input)) : null));
    }
  }

  async function replay(id, button) {
    button.disabled = true;
    button.textContent = 'Replaying…';
    try {
      const result = await api('POST', '/requests/' + enc(id) + '/replay');
      const view = result.replay;
      state.replayNotice = { id: view.id, original: result.original || id };
      state.selectedId = view.id;
      state.detail = view;
      renderDetail();
      const ok = view.outcome === 'booked' || view.outcome === 'replayed';
      toast(ok ? 'Replayed: booked' + (view.sf_id ? ' as ' + view.sf_id : '') + '.' : 'Replayed: ' + view.outcome + '.', ok ? 'ok' : 'warn');
      state.logSig = '';
      once('log', refreshLog).catch(() => {});
      once('stats', refreshStats).catch(() => {});
    } catch (err) {
      toast(err.status === 409 ? 'This request was already replayed.' : err.status === 404
        ? 'This request cannot be replayed (no input was kept).' : 'Replay failed: ' + err.message, 'error');
      button.disabled = false;
      button.textContent = 'Replay booking';
      once('detail', refreshDetail).catch(() => {});
    }
  }

  // ---------- stats and charts ----------

  async function refreshStats() {
    state.stats = await api('GET', '/stats?minutes=' + STATS_MINUTES);
    renderStats();
  }

  // a y scale of round steps: counts step by whole numbers, times may step by 2.5
  function niceScale(top, whole) {
    const raw = top / 4;
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    const steps = whole ? [1, 2, 5, 10] : [1, 2, 2.5, 5, 10];
    let step = steps.map((m) => m * p).find((v) => v >= raw) || 10 * p;
    if (whole) step = Math.max(1, Math.round(step));
    const max = Math.ceil(top / step - 1e-9) * step;
    const ticks = [];
    for (let v = 0; v <= max + step / 2; v += step) ticks.push(v);
    return { max, ticks };
  }

  function tickLabel(v, unit) {
    if (unit === 'ms' && v >= 1000) return (v / 1000) + ' s';
    return Number.isInteger(v) ? String(v) : v.toFixed(1);
  }

  // the time axis both charts share: one slot per bucket up to now
  function timeAxis(stats) {
    const bucket = Math.max(1, Number(stats.bucket_seconds) || 60) * 1000;
    const count = Math.max(1, Math.round(STATS_MINUTES * 60000 / bucket));
    const last = Math.floor(Date.now() / bucket) * bucket;
    const first = last - (count - 1) * bucket;
    return { bucket, count, first, index: (t) => Math.floor((t - first) / bucket) };
  }

  function frame(container, label, unit, scale) {
    const maxY = scale.max;
    const width = Math.max(280, Math.floor(container.clientWidth || 560));
    const height = 200;
    const m = { l: 40, r: 12, t: 10, b: 24 };
    const svg = s('svg', { width, height, viewBox: '0 0 ' + width + ' ' + height, role: 'img', 'aria-label': label, class: 'chart-svg' });
    const plot = { x: m.l, y: m.t, w: width - m.l - m.r, h: height - m.t - m.b };
    const y = (v) => plot.y + plot.h - (v / maxY) * plot.h;
    const grid = s('g', { class: 'grid', 'aria-hidden': 'true' });
    for (const t of scale.ticks) {
      grid.append(s('line', { x1: plot.x, x2: plot.x + plot.w, y1: y(t), y2: y(t) }));
      grid.append(s('text', { x: plot.x - 6, y: y(t) + 4, 'text-anchor': 'end', class: 'axis' }, tickLabel(t, unit)));
    }
    svg.append(grid);
    return { svg, plot, y, width, height };
  }

  // time labels on round minutes, at least 60 px apart, kept inside the frame
  function xAxis(f, axis) {
    const g = s('g', { class: 'grid', 'aria-hidden': 'true' });
    const slot = f.plot.w / axis.count;
    const minutes = [1, 2, 5, 10, 15, 30, 60, 120].find((m) => (m * 60000 / axis.bucket) * slot >= 60) || 240;
    const every = minutes * 60000;
    for (let i = 0; i < axis.count; i++) {
      const t = axis.first + i * axis.bucket;
      if (t % every !== 0) continue;
      let x = f.plot.x + slot * (i + 0.5);
      let anchor = 'middle';
      if (x + 17 > f.plot.x + f.plot.w) { x = f.plot.x + f.plot.w; anchor = 'end'; }
      if (x - 17 < f.plot.x) { x = f.plot.x; anchor = 'start'; }
      g.append(s('line', { x1: x, x2: x, y1: f.plot.y + f.plot.h, y2: f.plot.y + f.plot.h + 4, class: 'baseline' }));
      g.append(s('text', { x, y: f.plot.y + f.plot.h + 16, 'text-anchor': anchor, class: 'axis' }, minuteFmt.format(new Date(t))));
    }
    g.append(s('line', { x1: f.plot.x, x2: f.plot.x + f.plot.w, y1: f.plot.y + f.plot.h, y2: f.plot.y + f.plot.h, class: 'baseline' }));
    f.svg.append(g);
    return slot;
  }

  function emptyNote(f, text) {
    f.svg.append(s('text', { x: f.plot.x + f.plot.w / 2, y: f.plot.y + f.plot.h / 2, 'text-anchor': 'middle', class: 'empty-note' }, text));
  }

  function renderBookings(stats, axis) {
    const box = byId('chart-bookings');
    const per = Array.from({ length: axis.count }, () => ({}));
    const totals = {};
    for (const p of Array.isArray(stats.series) ? stats.series : []) {
      if (p.direction === 'out') continue; // Health Cloud's callouts: counted on their own tile
      if (state.chartSource && p.source !== state.chartSource) continue;
      const i = axis.index(p.t);
      if (i < 0 || i >= axis.count) continue;
      per[i][p.outcome] = (per[i][p.outcome] || 0) + (p.count || 0);
      totals[p.outcome] = (totals[p.outcome] || 0) + (p.count || 0);
    }
    const stackMax = Math.max(0, ...per.map((b) => Object.values(b).reduce((a, c) => a + c, 0)));
    const scale = niceScale(Math.max(4, stackMax), true);
    const summary = Object.keys(totals).length
      ? Object.entries(totals).map(([o, c]) => c + ' ' + (OUTCOME_LABEL[o] || o).toLowerCase()).join(', ')
      : 'none';
    const f = frame(box, 'Bookings from the EHRs per minute over the last hour' + (state.chartSource ? ' from ' + state.chartSource : '') + ': ' + summary, 'count', scale);
    const slot = xAxis(f, axis);
    const barW = Math.max(1, slot * 0.72);
    const order = OUTCOMES.map(([o]) => o);
    const bars = s('g', null);
    per.forEach((b, i) => {
      let base = 0;
      const x = f.plot.x + slot * i + (slot - barW) / 2;
      const rank = (o) => (order.includes(o) ? order.indexOf(o) : order.length);
      const keys = Object.keys(b).sort((a, c) => rank(a) - rank(c));
      for (const o of keys) {
        const c = b[o];
        if (!c) continue;
        const y0 = f.y(base);
        const y1 = f.y(base + c);
        bars.append(s('rect', { x, y: y1, width: barW, height: Math.max(1, y0 - y1), class: 'fill-' + (OUTCOME_LABEL[o] ? o : 'other') },
          s('title', null, minuteFmt.format(new Date(axis.first + i * axis.bucket)) + ' · ' + (OUTCOME_LABEL[o] || o) + ': ' + c)));
        base += c;
      }
    });
    f.svg.append(bars);
    if (!stackMax) emptyNote(f, 'No requests in the last hour');
    box.replaceChildren(f.svg);

    const legend = clear(byId('legend-bookings'));
    for (const [o, label] of OUTCOMES) {
      if (!totals[o] && !['booked', 'unmapped', 'failed'].includes(o)) continue;
      legend.append(h('li', null, h('span', { class: 'swatch bg-' + o, 'aria-hidden': 'true' }), label, ' ',
        h('span', { class: 'muted' }, numFmt.format(totals[o] || 0))));
    }
    return totals;
  }

  function renderLatency(stats, axis) {
    const box = byId('chart-latency');
    const points = (Array.isArray(stats.latency) ? stats.latency : []).filter((p) => {
      const i = axis.index(p.t);
      return i >= 0 && i < axis.count;
    }).sort((a, b) => a.t - b.t);
    const top = Math.max(0, ...points.map((p) => Math.max(p.p50 || 0, p.p95 || 0, p.p99 || 0)));
    const scale = niceScale(Math.max(10, top), false);
    const latest = points[points.length - 1];
    const f = frame(box, 'Latency percentiles per minute over the last hour' + (latest
      ? ', latest p50 ' + fmtMs(latest.p50) + ', p95 ' + fmtMs(latest.p95) + ', p99 ' + fmtMs(latest.p99) : ': no data'), 'ms', scale);
    const slot = xAxis(f, axis);
    const xOf = (t) => f.plot.x + slot * (axis.index(t) + 0.5);
    for (const [key] of PERCENTILES.slice().reverse()) {
      let d = '';
      let prev = null;
      const dots = s('g', { class: 'dots stroke-' + key });
      for (const p of points) {
        if (typeof p[key] !== 'number') { prev = null; continue; }
        const i = axis.index(p.t);
        const x = xOf(p.t);
        const y = f.y(p[key]);
        d += (prev !== null && i === prev + 1 ? 'L' : 'M') + x.toFixed(1) + ' ' + y.toFixed(1);
        prev = i;
        dots.append(s('circle', { cx: x, cy: y, r: 2.5 },
          s('title', null, minuteFmt.format(new Date(axis.first + i * axis.bucket)) + ' · ' + key + ' ' + fmtMs(p[key]))));
      }
      f.svg.append(s('path', { d: d || 'M0 0', class: 'line stroke-' + key }), dots);
    }
    if (!points.length) emptyNote(f, 'No latency data in the last hour');
    box.replaceChildren(f.svg);

    const legend = clear(byId('legend-latency'));
    for (const [key, label] of PERCENTILES) {
      legend.append(h('li', null, h('span', { class: 'swatch line-swatch bg-' + key, 'aria-hidden': 'true' }), label,
        latest && typeof latest[key] === 'number' ? [' ', h('span', { class: 'muted' }, fmtMs(latest[key]))] : null));
    }
    return latest;
  }

  function renderSalesforce(sf) {
    const used = sf && typeof sf.api_used === 'number' ? sf.api_used : null;
    const limit = sf && typeof sf.api_limit === 'number' && sf.api_limit > 0 ? sf.api_limit : null;
    const gauge = byId('sf-usage');
    const fill = gauge.querySelector('.gauge-fill');
    const text = byId('sf-usage-text');
    if (used !== null && limit !== null) {
      const pct = Math.min(100, (used / limit) * 100);
      // CSSOM, which the style-src policy allows; a sliver stays visible once anything is used
      fill.style.width = (used > 0 ? Math.max(pct, 1) : 0).toFixed(1) + '%';
      gauge.className = 'gauge ' + (pct >= 90 ? 'gauge-crit' : pct >= 75 ? 'gauge-warn' : 'gauge-ok');
      gauge.setAttribute('aria-valuenow', pct.toFixed(0));
      gauge.setAttribute('aria-valuetext', numFmt.format(used) + ' of ' + numFmt.format(limit));
      const shown = used > 0 && pct < 0.1 ? '<0.1' : pct.toFixed(pct < 10 ? 1 : 0);
      text.textContent = numFmt.format(used) + ' / ' + numFmt.format(limit) + ' (' + shown + '%)';
    } else {
      fill.style.width = '0%';
      gauge.className = 'gauge';
      gauge.setAttribute('aria-valuenow', '0');
      gauge.setAttribute('aria-valuetext', 'not reported yet');
      text.textContent = 'Not reported yet';
    }
    const circuit = byId('circuit');
    const key = sf && CIRCUIT[sf.circuit] ? sf.circuit : null;
    circuit.dataset.state = key || 'unknown';
    const pill = circuit.querySelector('.pill');
    pill.className = 'pill circuit-' + (key || 'unknown');
    pill.textContent = key ? CIRCUIT[key][0] : 'Unknown';
    circuit.querySelector('.circuit-note').textContent = key ? CIRCUIT[key][1] : '';
  }

  function renderStats() {
    const stats = state.stats;
    if (!stats || byId('panel-activity').hidden) return;
    const axis = timeAxis(stats);
    renderBookings(stats, axis);
    const latest = renderLatency(stats, axis);
    renderSalesforce(stats.salesforce);
    // the tiles count every source, whatever the chart shows
    let booked = 0;
    let attention = 0;
    let callouts = 0;
    for (const p of Array.isArray(stats.series) ? stats.series : []) {
      if (p.direction === 'out') callouts += p.count || 0;
      else if (p.outcome === 'booked') booked += p.count || 0;
      if (ATTENTION.has(p.outcome)) attention += p.count || 0;
    }
    byId('kpi-booked').textContent = numFmt.format(booked);
    byId('kpi-callouts').textContent = numFmt.format(callouts);
    const att = byId('kpi-attention');
    att.textContent = numFmt.format(attention);
    att.classList.toggle('kpi-bad', attention > 0);
    const fresh = latest && Date.now() - latest.t < 3 * axis.bucket;
    byId('kpi-p95').textContent = fresh ? fmtMs(latest.p95) : '–';
  }

  // ---------- queue ----------

  async function refreshQueue() {
    const data = await api('GET', '/queue');
    state.queue = data && data.sources ? data.sources : {};
    renderQueue();
  }

  function renderQueue() {
    const sources = state.queue || {};
    let dead = 0;
    for (const list of Object.values(sources)) dead += list.filter((e) => e.where === 'dead').length;
    byId('kpi-dead').textContent = numFmt.format(dead);
    byId('kpi-dead').classList.toggle('kpi-bad', dead > 0);
    const badge = byId('dead-count');
    badge.hidden = !dead;
    badge.textContent = String(dead);
    badge.setAttribute('aria-label', dead + ' dead letters');

    const box = byId('queue');
    const names = Object.keys(sources).sort();
    // keep a pending drop confirmation through a refresh
    if (box.querySelector('[data-confirm="1"]')) return;
    if (!names.length) {
      box.replaceChildren(h('div', { class: 'card empty-card' }, h('p', { class: 'muted' }, 'No source delivers through the queue.')));
      return;
    }
    box.replaceChildren(...names.map((name) => queueCard(name, sources[name] || [])));
  }

  function queueCard(source, entries) {
    const counts = { ready: 0, delayed: 0, dead: 0 };
    for (const e of entries) counts[e.where] = (counts[e.where] || 0) + 1;
    const head = h('div', { class: 'card-head' }, h('h2', null, source),
      h('div', { class: 'chips' }, Object.entries(counts).map(([w, c]) =>
        h('span', { class: 'qcount q-' + w + (c ? '' : ' zero') }, QUEUE_WHERE[w] + ': ' + c))));
    const card = h('section', { class: 'card', testid: 'queue-source', 'data-source': source, 'aria-label': source + ' queue' }, head);
    if (!entries.length) {
      card.append(h('p', { class: 'muted pad' }, 'Empty: nothing waiting.'));
      return card;
    }
    const rows = entries.map((e) => {
      const actions = h('td', { class: 'actions nowrap' });
      if (e.where === 'dead') {
        const replayBtn = h('button', { type: 'button', class: 'btn btn-sm btn-primary', testid: 'queue-replay' }, 'Replay');
        const dropBtn = h('button', { type: 'button', class: 'btn btn-sm btn-danger-ghost', testid: 'queue-drop' }, 'Drop');
        replayBtn.addEventListener('click', () => queueAction(source, e.id, 'replay', replayBtn));
        dropBtn.addEventListener('click', () => {
          // two steps: a dropped booking is gone for good
          if (dropBtn.dataset.confirm !== '1') {
            dropBtn.dataset.confirm = '1';
            dropBtn.textContent = 'Confirm drop';
            dropBtn.classList.add('btn-danger');
            setTimeout(() => {
              if (dropBtn.isConnected && dropBtn.dataset.confirm === '1') {
                delete dropBtn.dataset.confirm;
                dropBtn.textContent = 'Drop';
                dropBtn.classList.remove('btn-danger');
              }
            }, 5000);
            return;
          }
          delete dropBtn.dataset.confirm;
          queueAction(source, e.id, 'drop', dropBtn);
        });
        actions.append(replayBtn, ' ', dropBtn);
      } else {
        actions.append(dash());
      }
      return h('tr', { testid: 'queue-entry', 'data-id': e.id, 'data-where': e.where },
        h('td', null, h('code', null, e.id)),
        h('td', null, h('span', { class: 'badge q-' + e.where }, QUEUE_WHERE[e.where] || e.where)),
        h('td', { class: 'num' }, String(e.attempts ?? '–')),
        h('td', { class: 'nowrap' }, timeEl(e.accepted_ms)),
        h('td', { class: 'nowrap' }, e.where === 'dead' ? dash() : timeEl(e.due_ms)),
        h('td', null, e.last_error ? h('code', { class: 'err' }, e.last_error) : dash()),
        actions);
    });
    card.append(h('div', { class: 'table-wrap' }, h('table', { class: 'table' },
      h('caption', { class: 'sr-only' }, 'Queued bookings from ' + source),
      h('thead', null, h('tr', null, ['ID', 'State', 'Attempts', 'Accepted', 'Due', 'Last error', 'Actions'].map((t, i) =>
        h('th', { scope: 'col', class: i === 2 ? 'num' : null }, t)))),
      h('tbody', null, rows))));
    return card;
  }

  async function queueAction(source, id, action, button) {
    button.disabled = true;
    try {
      await api('POST', '/queue/' + enc(source) + '/' + enc(id) + '/' + action);
      toast(action === 'replay' ? 'Sent back to the ' + source + ' queue for delivery.' : 'Dropped from the ' + source + ' queue.', 'ok');
    } catch (err) {
      toast((action === 'replay' ? 'Replay' : 'Drop') + ' failed: ' + err.message, 'error');
    }
    const box = byId('queue');
    for (const b of box.querySelectorAll('[data-confirm]')) delete b.dataset.confirm;
    await once('queue', refreshQueue).catch(() => {});
  }

  // ---------- two-step buttons ----------

  // a button that asks once more before `run` (what it does cannot be undone); back to its label
  // after a few seconds unconfirmed
  function armConfirm(button, label, confirmLabel, run) {
    let timer = null;
    button.addEventListener('click', () => {
      clearTimeout(timer);
      if (button.dataset.confirm !== '1') {
        button.dataset.confirm = '1';
        button.textContent = confirmLabel;
        button.classList.add('btn-danger');
        timer = setTimeout(() => {
          if (button.isConnected && button.dataset.confirm === '1') disarm(button, label);
        }, 5000);
        return;
      }
      disarm(button, label);
      run(button);
    });
    button.dataset.label = label;
  }

  function disarm(button, label) {
    delete button.dataset.confirm;
    button.classList.remove('btn-danger');
    if (label || button.dataset.label) button.textContent = label || button.dataset.label;
  }

  // ---------- held bookings ----------

  async function refreshHeld() {
    const seq = ++state.seq.held;
    const data = await api('GET', '/held');
    if (seq !== state.seq.held) return; // an action's refresh came after it
    state.held = data && data.sources ? data.sources : {};
    renderHeld();
  }

  function renderHeld() {
    const sources = state.held || {};
    let waiting = 0;
    for (const list of Object.values(sources)) waiting += list.filter((e) => e.state === 'held').length;
    const badge = byId('held-count');
    badge.hidden = !waiting;
    badge.textContent = String(waiting);
    badge.setAttribute('aria-label', waiting + (waiting === 1 ? ' booking held' : ' bookings held'));

    const box = byId('held');
    // keep a pending refusal through a refresh, and the rows (and focus) when nothing changed
    if (box.querySelector('[data-confirm="1"]')) return;
    const sig = JSON.stringify(sources);
    if (sig === state.heldSig) return;
    state.heldSig = sig;
    const names = Object.keys(sources).sort();
    if (!names.length) {
      box.replaceChildren(h('div', { class: 'card empty-card', testid: 'held-empty' },
        h('p', { class: 'muted' }, 'Nothing is held: every booking\'s patient was known to the org.')));
      return;
    }
    box.replaceChildren(...names.map((name) => heldCard(name, sources[name] || [])));
  }

  function heldWhy(entry) {
    const why = entry.why;
    if (!why) return dash();
    let words = Object.prototype.hasOwnProperty.call(HELD_WHY, why) ? HELD_WHY[why] : null;
    // refused other than by an operator or for a gap: its deadline passed while it waited for this
    if (entry.state === 'refused' && why !== 'refused-by-operator' && why !== 'unmatched') {
      words = 'Refused at its deadline. ' + (words || '');
    }
    return h('div', { class: 'why' }, h('code', { testid: 'held-why' }, why),
      words ? h('span', { class: 'muted small' }, words) : null);
  }

  function heldCard(source, entries) {
    const phi = state.role === 'phi';
    const counts = { held: 0, refused: 0 };
    for (const e of entries) counts[e.state] = (counts[e.state] || 0) + 1;
    const head = h('div', { class: 'card-head' }, h('h2', null, source),
      h('div', { class: 'chips' }, Object.entries(counts).map(([st, c]) =>
        h('span', { class: 'qcount h-' + st + (c ? '' : ' zero') }, (HELD_STATE[st] || st) + ': ' + c))));
    const card = h('section', { class: 'card', testid: 'held-source', 'data-source': source, 'aria-label': source + ' held bookings' }, head);
    const rows = entries.map((e) => {
      const actions = h('td', { class: 'actions nowrap' });
      if (e.state === 'held') {
        const releaseBtn = h('button', { type: 'button', class: 'btn btn-sm btn-primary', testid: 'held-release' }, 'Release now');
        const refuseBtn = h('button', { type: 'button', class: 'btn btn-sm btn-danger-ghost', testid: 'held-refuse' }, 'Refuse');
        releaseBtn.addEventListener('click', () => heldAction(source, e.hold, 'release', releaseBtn));
        armConfirm(refuseBtn, 'Refuse', 'Confirm refuse', () => heldAction(source, e.hold, 'refuse', refuseBtn));
        actions.append(releaseBtn, ' ', refuseBtn);
      } else {
        actions.append(dash());
      }
      const next = e.state !== 'held' ? dash() : typeof e.due_ms === 'number' ? timeEl(e.due_ms) : h('span', null, 'Now');
      return h('tr', { testid: 'held-entry', 'data-hold': e.hold, 'data-state': e.state },
        h('td', null, h('code', { class: 'hold-id' }, e.hold)),
        h('td', null, h('span', { class: 'badge h-' + (HELD_STATE[e.state] ? e.state : 'other'), testid: 'held-state' },
          HELD_STATE[e.state] || String(e.state))),
        h('td', { class: 'nowrap' }, timeEl(e.since_ms)),
        h('td', { class: 'nowrap' }, timeEl(e.deadline_ms)),
        h('td', { class: 'num' }, String(e.attempts ?? '–')),
        h('td', { class: 'nowrap', testid: 'held-next' }, next),
        h('td', null, heldWhy(e)),
        // whom it waits for: a PHI session asks for it, one booking at a time (each view audited)
        phi ? h('td', { class: 'phi-cell' }, heldWho(source, e.hold)) : null,
        actions);
    });
    const heads = ['Hold', 'State', 'Since', 'Deadline', 'Tries', 'Next try', 'Why'];
    card.append(h('div', { class: 'table-wrap' }, h('table', { class: 'table' },
      h('caption', { class: 'sr-only' }, 'Held bookings from ' + source),
      h('thead', null, h('tr', null,
        heads.map((t) => h('th', { scope: 'col', class: t === 'Tries' ? 'num' : null }, t)),
        phi ? h('th', { scope: 'col' }, 'Patient ', h('span', { class: 'phi-tag' }, 'PHI')) : null,
        h('th', { scope: 'col', class: 'actions' }, 'Actions'))),
      h('tbody', null, rows))));
    return card;
  }

  function heldWho(source, hold) {
    const who = state.heldWho[hold];
    if (who !== undefined) return who ? h('code', { testid: 'held-patient' }, who) : dash();
    const button = h('button', { type: 'button', class: 'btn btn-sm', testid: 'held-show-patient' }, 'Show patient');
    button.addEventListener('click', async () => {
      button.disabled = true;
      const gen = state.gen;
      try {
        const one = await api('GET', '/held/' + enc(source) + '/' + enc(hold));
        if (gen !== state.gen) return; // signed out meanwhile
        state.heldWho[hold] = one && one.patient ? String(one.patient) : '';
        button.replaceWith(heldWho(source, hold));
      } catch (err) {
        button.disabled = false;
        toast(err.status === 404 ? 'This booking is no longer held.' : 'The patient could not be shown.', 'error');
      }
    });
    return button;
  }

  async function heldAction(source, hold, action, button) {
    button.disabled = true;
    try {
      await api('POST', '/held/' + enc(source) + '/' + enc(hold) + '/' + action);
      toast(action === 'release' ? 'Released: it is tried again now.' : 'Refused: the EHR\'s next retry gets the refusal.', 'ok');
    } catch (err) {
      const what = action === 'release' ? 'Release' : 'Refuse';
      toast(err.status === 404 ? what + ' failed: this booking is no longer held (booked, refused or cancelled meanwhile).'
        : err.status === 409 ? what + ' failed: it is being tried right now. Try again in a moment.'
          : what + ' failed: ' + err.message, 'error');
    }
    // the list as it is now, whatever a refresh already on its way says
    for (const b of byId('held').querySelectorAll('[data-confirm]')) disarm(b);
    state.heldSig = '';
    state.busy.delete('held');
    await once('held', refreshHeld).catch(() => {});
  }

  async function forgetIdentities(button) {
    button.disabled = true;
    try {
      const result = await api('POST', '/identity/forget');
      const n = result && typeof result.forgotten === 'number' ? result.forgotten : 0;
      toast(n ? 'Forgot ' + numFmt.format(n) + (n === 1 ? ' cached record' : ' cached records') + ': the next bookings look their people up in the org again.'
        : 'No cached records to forget.', 'ok');
    } catch (err) {
      toast('Forget failed: ' + err.message, 'error');
    } finally {
      button.disabled = false;
    }
  }

  // ---------- code maps ----------

  async function refreshCodemaps() {
    const data = await api('GET', '/codemaps');
    const sources = data && data.sources ? data.sources : {};
    const sig = JSON.stringify(sources);
    const changed = sig !== JSON.stringify(state.codemaps);
    state.codemaps = sources;
    setSources(Object.keys(sources).sort());
    if (changed) {
      renderCodemaps();
      if (state.detail) renderDetail();
    }
  }

  function renderCodemaps() {
    const sources = state.codemaps || {};
    const names = Object.keys(sources).sort();
    let problems = 0;
    const cards = names.map((name) => {
      const m = sources[name] || {};
      const files = Array.isArray(m.files) ? m.files : [];
      const probs = Array.isArray(m.problems) ? m.problems : [];
      problems += probs.length ? 1 : 0;
      return h('section', { class: 'card map-card' + (probs.length ? ' map-bad' : ''), testid: 'codemap', 'data-source': name, 'aria-label': name + ' code maps' },
        h('div', { class: 'card-head' }, h('h2', null, name),
          probs.length ? h('span', { class: 'pill circuit-open' }, 'Files refused') : h('span', { class: 'pill circuit-closed' }, 'In use')),
        h('dl', { class: 'dl' }, field('Version', m.version ? h('code', { testid: 'map-version' }, m.version) : null)),
        h('p', { class: 'block-label' }, 'Files'),
        files.length ? h('ul', { class: 'files' }, files.map((f) => h('li', null, h('code', null, f)))) : h('p', { class: 'muted small' }, 'No map files.'),
        probs.length ? h('div', { class: 'callout callout-warn', testid: 'map-problems', role: 'note' },
          h('strong', null, 'The files on disk were refused; the previous maps keep serving.'),
          h('ul', null, probs.map((p) => h('li', null, p)))) : null);
    });
    byId('codemaps').replaceChildren(...cards);
    const count = byId('map-problem-count');
    count.hidden = !problems;
    count.textContent = String(problems);
    count.setAttribute('aria-label', problems + ' sources with refused map files');
  }

  // ---------- translate playground ----------

  function resetTranslateOutput() {
    clear(byId('translate-output')).append(h('p', { class: 'muted' }, 'The Salesforce request, or why it cannot be made, appears here.'));
  }

  async function translate(event) {
    event.preventDefault();
    const out = byId('translate-output');
    const source = byId('translate-source').value;
    const text = byId('translate-input').value;
    if (!source) return;
    try {
      JSON.parse(text);
    } catch (err) {
      clear(out).append(h('div', { class: 'callout callout-warn', testid: 'translate-issues' }, 'Not valid JSON: ' + err.message));
      return;
    }
    const button = byId('translate-submit');
    button.disabled = true;
    clear(out).append(h('p', { class: 'muted' }, 'Translating…'));
    try {
      const result = await api('POST', '/translate/' + enc(source), { body: text, contentType: 'application/fhir+json' });
      const warnings = result && Array.isArray(result.warnings) ? result.warnings : [];
      clear(out).append(
        h('p', { class: 'callout callout-ok', testid: 'translate-ok' }, 'Mapped. This is the request the gateway would send to Salesforce.'),
        warnings.length ? h('div', { class: 'callout callout-warn', testid: 'translate-warnings' },
          h('strong', null, 'Left out:'),
          h('ul', { class: 'issues' }, warnings.map((i) => h('li', { class: 'issue' },
            h('p', { class: 'issue-text' }, i.diagnostics),
            (i.expression || []).length ? h('p', { class: 'issue-where' }, 'At ', i.expression.map((e, n) => [n ? ', ' : '', h('code', null, e)])) : null)))) : null,
        h('pre', { class: 'code', testid: 'translate-request' }, JSON.stringify(result && result.request, null, 2)));
    } catch (err) {
      const issues = err.body && Array.isArray(err.body.issue) ? err.body.issue : [];
      clear(out).append(h('div', { class: 'callout callout-warn', testid: 'translate-issues' },
        h('strong', null, err.status === 422 ? 'Cannot be booked as it stands:' : 'The gateway refused it (' + err.status + '):'),
        issues.length ? h('ul', { class: 'issues' }, issues.map((i) => h('li', { class: 'issue' },
          i.code ? h('span', { class: 'issue-code' }, i.code) : null,
          h('p', { class: 'issue-text' }, (i.details && i.details.text) || i.diagnostics || ''),
          where(i).length ? h('p', { class: 'issue-where' }, 'At ', where(i).map((e, n) => [n ? ', ' : '', h('code', null, e)])) : null)))
          : h('p', null, err.message)));
    } finally {
      button.disabled = false;
    }
  }

  function formatPayload() {
    const area = byId('translate-input');
    try {
      area.value = JSON.stringify(JSON.parse(area.value), null, 2);
    } catch (err) {
      toast('Not valid JSON: ' + err.message, 'warn');
    }
  }

  // ---------- wiring ----------

  function init() {
    const outcome = byId('filter-outcome');
    for (const [o, label] of OUTCOMES) outcome.append(h('option', { value: o }, label));

    byId('signin-form').addEventListener('submit', signIn);
    byId('sign-out').addEventListener('click', signOut);
    byId('pause').addEventListener('click', togglePause);
    byId('filter-source').addEventListener('change', onFilter);
    byId('filter-outcome').addEventListener('change', onFilter);
    byId('filter-direction').addEventListener('change', onFilter);
    byId('chart-source').addEventListener('change', () => {
      state.chartSource = byId('chart-source').value;
      renderStats();
    });
    byId('detail-close').addEventListener('click', closeDetail);
    armConfirm(byId('identity-forget'), 'Forget cached records', 'Confirm forget', forgetIdentities);
    byId('translate-form').addEventListener('submit', translate);
    byId('translate-format').addEventListener('click', formatPayload);
    for (const tab of document.querySelectorAll('[role="tab"]')) {
      tab.addEventListener('click', () => selectTab(tab.dataset.tab, false));
      tab.addEventListener('keydown', onTabKey);
    }
    window.addEventListener('hashchange', () => { if (state.role) selectTab(tabFromHash(), false); });
    document.addEventListener('keydown', (event) => {
      if (event.key === 'Escape' && !byId('detail').hidden) closeDetail();
    });
    document.addEventListener('visibilitychange', () => { if (!document.hidden) tick(); });
    // charts are drawn at their box's width: again when it changes (window, drawer opened)
    let resizeTimer = null;
    const widths = new Map();
    const observer = new ResizeObserver((entries) => {
      const moved = entries.some((e) => {
        const w = Math.round(e.contentRect.width);
        const changed = w > 0 && widths.get(e.target) !== w;
        widths.set(e.target, w);
        return changed;
      });
      if (!moved) return;
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(renderStats, 120);
    });
    observer.observe(byId('chart-bookings'));
    observer.observe(byId('chart-latency'));
    resume();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
