// The CloudTask console: a client of the public GraphQL API like any other (queries and
// mutations over HTTP, live runs and logs over the graphql-transport-ws protocol). No
// build step and no dependencies; every text from the API goes into the page as text.

const main = document.getElementById('main');
const errorBox = document.getElementById('error');
const TOKENS = 'cloudtask.tokens';

// ---- session --------------------------------------------------------------------------
//
// The tokens are shared by the browser's tabs (local storage), so a refresh token, which
// works once, is spent by one tab at a time (a Web Lock where the browser has them) and
// the others take the new pair from storage.

function tokens() {
  try {
    return JSON.parse(localStorage.getItem(TOKENS));
  } catch {
    return null;
  }
}

function keep(payload) {
  localStorage.setItem(TOKENS, JSON.stringify({
    access: payload.accessToken,
    refresh: payload.refreshToken,
    email: payload.user.email,
    tenant: payload.tenant ? payload.tenant.name : null,
  }));
}

function forget() {
  localStorage.removeItem(TOKENS);
}

const AUTH_FIELDS = 'accessToken refreshToken user { email } tenant { name }';

class ApiError extends Error {
  constructor(message, code) {
    super(code ? `${message} (${code})` : message);
    this.code = code;
  }
}

const firstError = (errors) => new ApiError(errors[0]?.message ?? 'refused',
  errors[0]?.extensions?.code);

// `files`: { 'variables.input.package': File, … }, sent as a GraphQL multipart request.
async function post(query, variables, access, files = {}) {
  const headers = {};
  if (access) headers.authorization = `Bearer ${access}`;
  let body;
  const uploads = Object.entries(files).filter(([, file]) => file);
  if (uploads.length) {
    body = new FormData();
    body.append('operations', JSON.stringify({ query, variables }));
    body.append('map', JSON.stringify(Object.fromEntries(uploads.map(([path], i) => [i, [path]]))));
    uploads.forEach(([, file], i) => body.append(String(i), file, file.name));
  } else {
    headers['content-type'] = 'application/json';
    body = JSON.stringify({ query, variables });
  }
  const response = await fetch('/graphql', { method: 'POST', headers, body });
  let answer;
  try {
    answer = await response.json();
  } catch {
    throw new ApiError(`the API answered ${response.status}`, 'UNAVAILABLE');
  }
  if (answer.errors && answer.errors.length) throw firstError(answer.errors);
  return answer.data;
}

const withLock = (name, work) => (navigator.locks ? navigator.locks.request(name, work) : work());

// Renews the pair after `spent` (the access token the API refused) was refused; true when
// a usable access token is in storage afterwards.
function renew(spent) {
  return withLock('cloudtask.refresh', async () => {
    const held = tokens();
    if (!held) return false;
    // Renewed meanwhile (another request, another tab): nothing to spend.
    if (held.access !== spent) return true;
    try {
      const data = await post(
        `mutation($t: String!) { refreshToken(refreshToken: $t) { ${AUTH_FIELDS} } }`,
        { t: held.refresh });
      // Signed out meanwhile: the new pair is not kept.
      if (tokens()?.refresh !== held.refresh) return false;
      keep(data.refreshToken);
      return true;
    } catch {
      return false;
    }
  });
}

async function gql(query, variables = {}, files = {}) {
  const held = tokens();
  if (!held) throw new ApiError('signed out', 'UNAUTHENTICATED');
  try {
    return await post(query, variables, held.access, files);
  } catch (e) {
    if (e.code !== 'UNAUTHENTICATED' || !await renew(held.access)) throw e;
    const renewed = tokens();
    if (!renewed) throw e;
    return post(query, variables, renewed.access, files);
  }
}

// ---- subscriptions (graphql-transport-ws) -----------------------------------------------

// Subscribes over a socket of its own. `onStart` runs once the subscription is sent (what
// changed before it took hold is for the caller to read again), `onData` gets each
// payload's data, `onEnd` why it ended: 'complete', 'refused' (the access token: 4403),
// 'closed', or the error's code. Returns a function that unsubscribes.
function subscribe(query, variables, { onStart = () => {}, onData, onEnd = () => {} }) {
  const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/graphql`;
  const socket = new WebSocket(url, 'graphql-transport-ws');
  let ended = false;
  const end = (why) => {
    if (ended) return;
    ended = true;
    onEnd(why);
  };
  socket.onopen = () => {
    socket.send(JSON.stringify({ type: 'connection_init', payload: { accessToken: tokens()?.access } }));
  };
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    switch (message.type) {
      case 'connection_ack':
        socket.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query, variables } }));
        onStart();
        break;
      case 'ping':
        socket.send(JSON.stringify({ type: 'pong' }));
        break;
      case 'next':
        if (message.payload.errors) showError(firstError(message.payload.errors));
        else onData(message.payload.data);
        break;
      case 'error': {
        const error = firstError(message.payload);
        if (error.code !== 'UNAVAILABLE') showError(error);
        end(error.code ?? 'error');
        socket.close();
        break;
      }
      case 'complete':
        end('complete');
        socket.close();
        break;
    }
  };
  socket.onclose = (event) => end(event.code === 4403 ? 'refused' : 'closed');
  return () => { ended = true; socket.close(); };
}

// ---- pages and their lifetime -----------------------------------------------------------
//
// Each address shown is a view; a view that is no longer the current one (the address
// changed while it was loading) renders nothing and opens nothing, and what it opened is
// closed when it goes.

let current = null;

class View {
  constructor() {
    this.closers = [];
  }

  get live() {
    return current === this;
  }

  close() {
    this.closers.forEach((close) => close());
    this.closers = [];
  }

  render(title, ...content) {
    if (this.live) main.replaceChildren(el('div', {}, el('h1', {}, title), ...content));
  }

  every(ms, work) {
    const timer = setInterval(work, ms);
    this.closers.push(() => clearInterval(timer));
  }

  // Follows a subscription for as long as the view is shown: `reload` reads again what
  // the events update, each time the subscription (re)starts; a dropped socket is opened
  // again after a pause, a refused token renewed first.
  follow(query, variables, { onData, reload = () => {}, onComplete = () => {} }) {
    if (!this.live) return;
    const again = (ms) => setTimeout(() => this.follow(query, variables, { onData, reload, onComplete }), ms);
    // Variables given as a function are read at each (re)start.
    const close = subscribe(query, typeof variables === 'function' ? variables() : variables, {
        onStart: reload,
        onData: (data) => { if (this.live) onData(data); },
        onEnd: (why) => {
          if (!this.live) return;
          if (why === 'complete') onComplete();
          else if (why === 'refused') {
            renew(tokens()?.access).then((renewed) => { if (renewed) again(0); else signedOut(); });
          } else if (why === 'closed' || why === 'UNAVAILABLE') again(1000);
        },
      });
    this.closers.push(() => close());
  }
}

function signedOut() {
  forget();
  route();
}

// ---- helpers ------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === 'class') node.className = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function when(iso) {
  if (!iso) return '—';
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
}

function duration(run) {
  if (!run.startedAt) return '—';
  const end = run.finishedAt ? new Date(run.finishedAt) : new Date();
  const ms = end - new Date(run.startedAt);
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
}

// Why a run stands where it does (Run.reason), in a few words; Run.reasonMessage says more.
const REASONS = {
  OOM_KILLED: 'memory limit (OOM kill)', PIDS_LIMIT: 'process limit', OUTPUT_LIMIT: 'output limit',
  TIMEOUT: 'timed out', START_FAILED: 'could not start', USER_STOP: 'stopped by a user',
  TASK_PAUSED: 'the task was paused',
  REPLACED: 'replaced by a later fire', OVERLAP_SKIP: 'overlap: the previous run was going',
  MISFIRE: 'misfire', TASK_CHANGED: 'the task changed', WORKER_LOST: 'worker lost',
  FENCED: 'worker cut off from ZooKeeper', SHUTDOWN: 'worker shut down',
  TASK_MOVED: 'the task left its worker', QUEUE_EXPIRED: 'no worker took it in time',
  WAITING_FOR_WORKER: 'waiting for a worker',
};

function outcome(run) {
  if (run.reason === 'EXIT' && run.exitCode !== null && run.exitCode !== undefined) {
    return `exit ${run.exitCode}`;
  }
  if (run.reason === 'SIGNAL' && run.signal) return `signal ${run.signal}`;
  if (run.reason && REASONS[run.reason]) return REASONS[run.reason];
  if (run.exitCode !== null && run.exitCode !== undefined) return `exit ${run.exitCode}`;
  if (run.signal) return `signal ${run.signal}`;
  return run.error ?? run.reason ?? '';
}

const status = (value) => el('span', { class: `status ${value}`, 'data-status': value }, value);
const ongoing = (run) => run.status === 'QUEUED' || run.status === 'RUNNING';
// How far along a run is: a late answer never takes a shown run back.
const STAGE = { QUEUED: 0, RUNNING: 1 };
const stage = (run) => STAGE[run.status] ?? 2;

function showError(e) {
  errorBox.textContent = e.message;
  errorBox.hidden = false;
}

function clearError() {
  errorBox.hidden = true;
  errorBox.textContent = '';
}

// Runs `action`; an error is shown, a session that ended goes back to the sign-in form
// (a refused sign-in stays on its form, as typed).
async function attempt(action) {
  clearError();
  try {
    return await action();
  } catch (e) {
    if (e.code === 'UNAUTHENTICATED' && tokens()) signedOut();
    showError(e);
    return undefined;
  }
}

// ---- pages ----------------------------------------------------------------------------------

const RUN_FIELDS = `id status trigger attempt scheduledAt startedAt finishedAt exitCode signal error
  reason reasonMessage worker task { id name }`;

const LIMIT_FIELDS = 'memoryMb cpuMillis maxProcesses maxOutputBytes';

// A task's limits in words; what it leaves unset comes from its cluster's defaults.
function limitsText(own, defaults) {
  const one = (key, show) => {
    if (own?.[key] != null) return show(own[key]);
    if (defaults?.[key] != null) return `${show(defaults[key])} (cluster default)`;
    return null;
  };
  const parts = [
    one('memoryMb', (v) => `memory ${v} MiB`),
    one('cpuMillis', (v) => `CPU ${v / 1000} core`),
    one('maxProcesses', (v) => `${v} processes`),
    one('maxOutputBytes', (v) => `output ${v} bytes`),
  ].filter(Boolean);
  return parts.length ? parts.join(' · ') : 'none';
}

function signIn(view) {
  const email = el('input', { name: 'email', type: 'email', autocomplete: 'username', required: true });
  const password = el('input', {
    name: 'password', type: 'password', autocomplete: 'current-password', required: true,
  });
  const form = el('form', {
    class: 'sign-in',
    onsubmit: (event) => {
      event.preventDefault();
      attempt(async () => {
        const data = await post(
          `mutation($e: String!, $p: String!) { login(email: $e, password: $p) { ${AUTH_FIELDS} } }`,
          { e: email.value, p: password.value });
        keep(data.login);
        if (!location.hash || location.hash === '#/sign-in') location.hash = '#/tasks';
        else route();
      });
    },
  },
  el('label', {}, 'Email', el('br'), email),
  el('label', {}, 'Password', el('br'), password),
  el('button', { class: 'primary', type: 'submit' }, 'Sign in'));
  view.render('Sign in', form);
}

function runRow(run, withTask) {
  return el('tr', { 'data-run': run.id, 'data-at': run.scheduledAt },
    el('td', {}, el('a', { href: `#/runs/${run.id}` }, when(run.scheduledAt))),
    withTask ? el('td', {}, el('a', { href: `#/tasks/${run.task.id}` }, run.task.name)) : null,
    el('td', {}, status(run.status)),
    el('td', {}, run.trigger.toLowerCase(), run.attempt ? ` #${run.attempt}` : ''),
    el('td', {}, duration(run)),
    el('td', { title: run.reasonMessage ?? '' }, outcome(run)),
    el('td', {}, run.worker ?? '—'));
}

// A table of runs, newest first (a page of at most `size`), that run events keep current.
function runTable(runs, withTask, size) {
  const body = el('tbody', {}, runs.map((run) => runRow(run, withTask)));
  const table = el('table', { class: 'runs' },
    el('thead', {}, el('tr', {},
      el('th', {}, 'Scheduled'), withTask ? el('th', {}, 'Task') : null, el('th', {}, 'Status'),
      el('th', {}, 'Trigger'), el('th', {}, 'Duration'), el('th', {}, 'Outcome'),
      el('th', {}, 'Worker'))),
    body);
  // A shown run's row is replaced; a run not shown goes where its time puts it (a run
  // older than the oldest shown is past the page, and left out).
  const update = (run) => {
    const row = runRow(run, withTask);
    const old = body.querySelector(`tr[data-run="${CSS.escape(run.id)}"]`);
    if (old) {
      old.replaceWith(row);
      return;
    }
    const later = [...body.rows].find((r) => r.dataset.at < run.scheduledAt);
    if (later) body.insertBefore(row, later);
    else if (runs.length < size) body.append(row);
  };
  return { table, update };
}

async function runNow(task) {
  const data = await gql(`mutation($id: ID!) { runTaskNow(id: $id) { id } }`, { id: task.id });
  location.hash = `#/runs/${data.runTaskNow.id}`;
}

async function togglePause(task) {
  const verb = task.state === 'PAUSED' ? 'resumeTask' : 'pauseTask';
  await gql(`mutation($id: ID!) { ${verb}(id: $id) { id } }`, { id: task.id });
  route();
}

function taskActions(task) {
  return [
    el('button', { class: 'primary', type: 'button', onclick: () => attempt(() => runNow(task)) },
      'Run now'),
    el('button', { type: 'button', onclick: () => attempt(() => togglePause(task)) },
      task.state === 'PAUSED' ? 'Resume' : 'Pause'),
  ];
}

const TASKS = `{ tasks(first: 200) { nodes {
  id name state schedule timezone cluster { name } assignedWorker { name }
  lastRun { id status scheduledAt } nextFireTimes(count: 1)
} } }`;

async function tasksPage(view) {
  const tasks = (await gql(TASKS)).tasks.nodes;
  const create = el('p', {}, el('a', { class: 'button primary', href: '#/tasks/new' }, 'New task'));
  if (!tasks.length) {
    view.render('Tasks', create, el('p', { class: 'muted' }, 'No tasks yet.'));
    return;
  }
  // A task's last run: the one with the latest time (an event may be of an older run;
  // one of the same time is the shown run changing, or its retry).
  const showLast = (cell, run) => {
    if (!cell || !run || (cell.dataset.at && cell.dataset.at > run.scheduledAt)) return;
    cell.dataset.at = run.scheduledAt;
    cell.replaceChildren(status(run.status), ' ',
      el('a', { href: `#/runs/${run.id}` }, when(run.scheduledAt)));
  };
  const lastCell = (id) => main.querySelector(`tr[data-task="${CSS.escape(id)}"] .last-run`);
  const rows = tasks.map((task) => {
    const last = el('td', { class: 'last-run' }, '—');
    showLast(last, task.lastRun);
    return el('tr', { 'data-task': task.id },
      el('td', {}, el('a', { href: `#/tasks/${task.id}` }, task.name)),
      el('td', {}, task.cluster.name),
      el('td', {}, el('code', {}, task.schedule), ' ', el('span', { class: 'muted' }, task.timezone)),
      el('td', {}, status(task.state)),
      last,
      el('td', {}, task.state === 'PAUSED' ? '—' : when(task.nextFireTimes[0])),
      el('td', {}, task.assignedWorker?.name ?? '—'),
      el('td', { class: 'actions' }, taskActions(task)));
  });
  view.render('Tasks', create, el('table', { class: 'tasks' },
    el('thead', {}, el('tr', {},
      ['Name', 'Cluster', 'Schedule', 'State', 'Last run', 'Next fire', 'Worker', '']
        .map((h) => el('th', {}, h)))),
    el('tbody', {}, rows)));
  view.follow(`subscription { runEvents { id status scheduledAt task { id } } }`, {}, {
    onData: ({ runEvents: run }) => showLast(lastCell(run.task.id), run),
    reload: () => gql(`{ tasks(first: 200) { nodes { id lastRun { id status scheduledAt } } } }`)
      .then((data) => data.tasks.nodes.forEach((t) => showLast(lastCell(t.id), t.lastRun)), () => {}),
  });
}

async function newTaskPage(view) {
  const { clusters } = await gql(`{ clusters { id name } }`);
  if (!clusters.length) {
    view.render('New task', el('p', { class: 'muted' },
      'A task runs on a cluster, and this tenant has none yet (createCluster, in GraphiQL at ',
      el('a', { href: '/graphql' }, '/graphql'), ').'));
    return;
  }
  const field = (label, input, hint) => el('label', {}, label, el('br'), input,
    hint ? el('span', { class: 'muted hint' }, hint) : null);
  const input = (name, attrs = {}) => el('input', { name, ...attrs });
  const choice = (name, options) => el('select', { name },
    options.map(([value, text]) => el('option', { value }, text)));
  const form = el('form', {
    class: 'task-form',
    onsubmit: (event) => {
      event.preventDefault();
      const data = new FormData(form);
      const text = (name) => String(data.get(name) ?? '').trim();
      const spec = {
        clusterId: text('cluster'),
        name: text('name'),
        description: text('description'),
        schedule: text('schedule'),
        command: text('command'),
        overlapPolicy: text('overlap'),
        paused: data.get('paused') === 'on',
      };
      if (text('timezone')) spec.timezone = text('timezone');
      if (text('timeout')) spec.timeoutSeconds = Number(text('timeout'));
      const file = data.get('package');
      const upload = file && file.size ? file : null;
      attempt(async () => {
        const created = await gql(
          `mutation($input: CreateTaskInput!) { createTask(input: $input) { id } }`,
          { input: { ...spec, package: null } },
          { 'variables.input.package': upload });
        location.hash = `#/tasks/${created.createTask.id}`;
      });
    },
  },
  field('Cluster', choice('cluster', clusters.map((c) => [c.id, c.name]))),
  field('Name', input('name', { required: true })),
  field('Description', input('description')),
  field('Schedule', input('schedule', { required: true, placeholder: '*/5 * * * *' }),
    '5 fields, or 6 with seconds first; @hourly, @daily…'),
  field('Timezone', input('timezone', { placeholder: 'UTC' }), 'IANA name, e.g. Europe/Paris'),
  field('Command', input('command', { required: true, placeholder: './run.sh' }),
    'run as sh -c in the unpacked package'),
  field('Package', input('package', { type: 'file', accept: '.zip,.tar.gz,.tgz' }),
    'a zip or tar.gz archive (optional)'),
  field('Timeout (seconds)', input('timeout', { type: 'number', min: 1 })),
  field('If still running at the next fire', choice('overlap',
    [['SKIP', 'skip the fire'], ['ALLOW', 'run alongside'], ['REPLACE', 'stop it, run the new one']])),
  el('label', {}, input('paused', { type: 'checkbox' }), ' Create paused'),
  el('p', {}, el('button', { class: 'primary', type: 'submit' }, 'Create task')));
  view.render('New task', form);
}

async function taskPage(view, id) {
  const data = await gql(`query($id: ID!) { task(id: $id) {
    id name description state version schedule timezone command timeoutSeconds overlapPolicy
    misfirePolicy maxRetries labels cluster { name defaultLimits { ${LIMIT_FIELDS} } }
    limits { ${LIMIT_FIELDS} } assignedWorker { name } packageSha256
    nextFireTimes(count: 3) runs(first: 50) { nodes { ${RUN_FIELDS} } }
  } }`, { id });
  const task = data.task;
  const facts = [
    ['State', status(task.state)],
    ['Cluster', task.cluster.name],
    ['Worker', task.assignedWorker?.name ?? '—'],
    ['Schedule', [el('code', {}, task.schedule), ` (${task.timezone})`]],
    ['Next fires', task.state === 'PAUSED' ? 'paused' : task.nextFireTimes.map(when).join(', ')],
    ['Command', el('code', {}, task.command)],
    ['Package', task.packageSha256 ? el('code', {}, task.packageSha256.slice(0, 12)) : 'none'],
    ['Timeout', task.timeoutSeconds ? `${task.timeoutSeconds} s` : 'none'],
    ['Limits', limitsText(task.limits, task.cluster.defaultLimits)],
    ['Overlap / misfire', `${task.overlapPolicy} / ${task.misfirePolicy}`],
    ['Retries', String(task.maxRetries)],
    ['Labels', task.labels.join(', ') || '—'],
    ['Version', String(task.version)],
  ];
  const { table, update } = runTable(task.runs.nodes, false, 50);
  view.render(`Task ${task.name}`,
    task.description ? el('p', {}, task.description) : null,
    el('p', {}, taskActions(task)),
    el('dl', { class: 'facts' }, facts.map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)])),
    el('h2', {}, 'Runs'),
    table);
  const RUNS = `query($id: ID!) { task(id: $id) { runs(first: 50) { nodes { ${RUN_FIELDS} } } } }`;
  view.follow(`subscription($t: ID) { runEvents(taskId: $t) { ${RUN_FIELDS} } }`, { t: id }, {
    onData: ({ runEvents }) => update(runEvents),
    reload: () => gql(RUNS, { id }).then((d) => d.task.runs.nodes.reverse().forEach(update), () => {}),
  });
}

async function runsPage(view) {
  const RUNS = `{ runs(first: 100) { nodes { ${RUN_FIELDS} } } }`;
  const { table, update } = runTable((await gql(RUNS)).runs.nodes, true, 100);
  view.render('Runs', table);
  view.follow(`subscription { runEvents { ${RUN_FIELDS} } }`, {}, {
    onData: ({ runEvents }) => update(runEvents),
    reload: () => gql(RUNS).then((d) => d.runs.nodes.reverse().forEach(update), () => {}),
  });
}

async function runPage(view, id) {
  const load = async () => (await gql(`query($id: ID!) { run(id: $id) { ${RUN_FIELDS} } }`, { id })).run;
  let run = await load();
  const head = el('div');
  const stop = el('button', {
    type: 'button',
    onclick: () => attempt(async () => {
      const stopped = await gql(`mutation($id: ID!) { stopRun(id: $id) { ${RUN_FIELDS} } }`, { id });
      show(stopped.stopRun);
    }),
  }, 'Stop');
  const show = (next) => {
    if (next.id !== id || stage(next) < stage(run)) return;
    run = next;
    head.replaceChildren(el('dl', { class: 'facts' },
      [['Task', el('a', { href: `#/tasks/${run.task.id}` }, run.task.name)],
        ['Status', status(run.status)],
        ['Trigger', `${run.trigger.toLowerCase()}, attempt ${run.attempt}`],
        ['Scheduled', when(run.scheduledAt)],
        ['Started', when(run.startedAt)],
        ['Finished', when(run.finishedAt)],
        ['Duration', duration(run)],
        ['Outcome', outcome(run) || '—'],
        ['Why', run.reasonMessage ?? '—'],
        ['Worker', run.worker ?? '—']]
        .map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)])));
    stop.hidden = !ongoing(run);
  };
  const refresh = () => load().then(show, () => {});
  show(run);
  const logs = el('pre', { class: 'logs', 'aria-live': 'polite' });
  view.render('Run', head, el('p', {}, stop), el('h2', {}, 'Output'), logs);

  // Its status from run events, read again when they (re)start, when the output starts or
  // ends, and every few seconds while it is going.
  view.follow(`subscription($t: ID) { runEvents(taskId: $t) { ${RUN_FIELDS} } }`,
    { t: run.task.id }, { onData: ({ runEvents }) => show(runEvents), reload: refresh });
  view.every(5000, () => { if (ongoing(run)) refresh(); });

  // Lines from the start, then live; after a dropped socket, on from the next offset.
  let next = 0;
  const follow = () => view.follow(
    `subscription($r: ID!, $from: Int) { runLogs(runId: $r, fromOffset: $from) { offset stream text } }`,
    () => ({ r: id, from: next }),
    {
      onData: ({ runLogs: line }) => {
        if (line.offset < next) return;
        if (run.status === 'QUEUED') refresh();
        next = line.offset + 1;
        const atBottom = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
        logs.append(el('span', { class: `line ${line.stream}` }, line.text));
        if (atBottom) logs.scrollTop = logs.scrollHeight;
      },
      onComplete: () => {
        logs.append(el('span', { class: 'line end' }, '— end of output —'));
        refresh();
      },
    });
  follow();
}

const CLUSTERS = `{ clusters { id name defaultLimits { ${LIMIT_FIELDS} } workers {
  name online hostname labels assignedTaskCount startedAt containment
} } }`;

function clusterSections(clusters) {
  if (!clusters.length) return el('p', { class: 'muted' }, 'No clusters yet.');
  return clusters.map((cluster) => [
    el('h2', {}, cluster.name),
    el('p', { class: 'muted' }, `Default run limits: ${limitsText(cluster.defaultLimits, null)}`),
    cluster.workers.length
      ? el('table', { class: 'workers' },
        el('thead', {}, el('tr', {},
          ['Worker', 'State', 'Host', 'Labels', 'Tasks', 'Started', 'Containment']
            .map((h) => el('th', {}, h)))),
        el('tbody', {}, cluster.workers.map((w) => el('tr', { 'data-worker': w.name },
          el('td', {}, w.name),
          el('td', {}, status(w.online ? 'online' : 'offline')),
          el('td', {}, w.hostname ?? '—'),
          el('td', {}, w.labels.join(', ') || '—'),
          el('td', {}, String(w.assignedTaskCount)),
          el('td', {}, when(w.startedAt)),
          el('td', {}, w.containment ?? '—')))))
      : el('p', { class: 'muted' }, 'No workers have joined.'),
  ]);
}

// The workers as they join and leave: each worker event reads the clusters again.
async function clustersPage(view) {
  const body = el('div', {}, clusterSections((await gql(CLUSTERS)).clusters));
  view.render('Clusters', body);
  const load = () => gql(CLUSTERS)
    .then((data) => {
      if (view.live) body.replaceChildren(el('div', {}, clusterSections(data.clusters)));
    }, () => {});
  view.follow(`subscription { workerEvents { clusterId worker kind } }`, {}, {
    onData: load,
    reload: load,
  });
}

// ---- routing --------------------------------------------------------------------------------

const routes = [
  [/^#\/tasks\/new$/, newTaskPage],
  [/^#\/tasks\/([\w-]+)$/, taskPage],
  [/^#\/runs\/([\w-]+)$/, runPage],
  [/^#\/runs$/, runsPage],
  [/^#\/clusters$/, clustersPage],
  [/^/, tasksPage],
];

function route() {
  current?.close();
  const view = new View();
  current = view;
  const held = tokens();
  document.getElementById('nav').hidden = !held;
  document.getElementById('sign-out').hidden = !held;
  document.getElementById('who').textContent = held
    ? `${held.email}${held.tenant ? ` · ${held.tenant}` : ''}` : '';
  if (!held) {
    signIn(view);
    return;
  }
  const hash = location.hash || '#/tasks';
  for (const [pattern, show] of routes) {
    const match = hash.match(pattern);
    if (match) {
      attempt(() => show(view, ...match.slice(1)));
      return;
    }
  }
}

document.getElementById('sign-out').addEventListener('click', async () => {
  const held = tokens();
  forget();
  if (held) {
    await post(`mutation($t: String!) { logout(refreshToken: $t) }`, { t: held.refresh }, held.access)
      .catch(() => {});
  }
  location.hash = '#/sign-in';
  route();
});
// Signed in or out in another tab.
window.addEventListener('storage', (event) => {
  if (event.key === TOKENS && !event.newValue !== !event.oldValue) route();
});
window.addEventListener('hashchange', route);
route();
