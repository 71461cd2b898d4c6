// The CloudTask console: a client of the public GraphQL API like any other (queries and
// mutations over HTTP, live runs and logs over the graphql-transport-ws protocol). No
// build step and no dependencies; every text from the API goes into the page as text.

const main = document.getElementById('main');
const errorBox = document.getElementById('error');
const TOKENS = 'cloudtask.tokens';

// ---- session --------------------------------------------------------------------------

function tokens() {
  try {
    return JSON.parse(sessionStorage.getItem(TOKENS));
  } catch {
    return null;
  }
}

function keep(payload) {
  sessionStorage.setItem(TOKENS, JSON.stringify({
    access: payload.accessToken,
    refresh: payload.refreshToken,
    email: payload.user.email,
    tenant: payload.tenant ? payload.tenant.name : null,
  }));
}

const AUTH_FIELDS = 'accessToken refreshToken user { email } tenant { name }';

class ApiError extends Error {
  constructor(message, code) {
    super(code ? `${message} (${code})` : message);
    this.code = code;
  }
}

async function post(query, variables, access) {
  const headers = { 'content-type': 'application/json' };
  if (access) headers.authorization = `Bearer ${access}`;
  const response = await fetch('/graphql', {
    method: 'POST', headers, body: JSON.stringify({ query, variables }),
  });
  let body;
  try {
    body = await response.json();
  } catch {
    throw new ApiError(`the API answered ${response.status}`, 'UNAVAILABLE');
  }
  if (body.errors && body.errors.length) {
    const first = body.errors[0];
    throw new ApiError(first.message, first.extensions && first.extensions.code);
  }
  return body.data;
}

// A spent access token is renewed once with the refresh token; a refused renewal signs out.
let renewing = null;
async function renew() {
  const held = tokens();
  if (!held) return false;
  renewing ??= post(`mutation($t: String!) { refreshToken(refreshToken: $t) { ${AUTH_FIELDS} } }`,
    { t: held.refresh })
    .then((data) => { keep(data.refreshToken); return true; })
    .catch(() => false)
    .finally(() => { renewing = null; });
  return renewing;
}

async function gql(query, variables = {}) {
  const held = tokens();
  if (!held) throw new ApiError('signed out', 'UNAUTHENTICATED');
  try {
    return await post(query, variables, held.access);
  } catch (e) {
    if (e.code === 'UNAUTHENTICATED' && await renew()) return post(query, variables, tokens().access);
    throw e;
  }
}

// ---- subscriptions (graphql-transport-ws) -----------------------------------------------

// Subscribes over a socket of its own; `onData` gets each payload's data, `onEnd` why it
// ended ('complete', 'error', 'refused', 'closed'). Returns a function that unsubscribes.
function subscribe(query, variables, onData, onEnd = () => {}) {
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
        break;
      case 'ping':
        socket.send(JSON.stringify({ type: 'pong' }));
        break;
      case 'next':
        if (message.payload.errors) showError(new ApiError(message.payload.errors[0].message,
          message.payload.errors[0].extensions?.code));
        else onData(message.payload.data);
        break;
      case 'error':
        showError(new ApiError(message.payload[0]?.message ?? 'subscription refused',
          message.payload[0]?.extensions?.code));
        end('error');
        socket.close();
        break;
      case 'complete':
        end('complete');
        socket.close();
        break;
    }
  };
  // 4403: the access token was refused (it may have expired since the page loaded).
  socket.onclose = (event) => end(event.code === 4403 ? 'refused' : 'closed');
  return () => { ended = true; socket.close(); };
}

// Live subscriptions of the page shown; closed when another page is shown.
let live = [];
function closeLive() {
  live.forEach((close) => close());
  live = [];
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

function outcome(run) {
  if (run.exitCode !== null && run.exitCode !== undefined) return `exit ${run.exitCode}`;
  if (run.signal) return `signal ${run.signal}`;
  return run.error ?? '';
}

const status = (value) => el('span', { class: `status ${value}`, 'data-status': value }, value);
const ongoing = (run) => run.status === 'QUEUED' || run.status === 'RUNNING';

function showError(e) {
  errorBox.textContent = e.message;
  errorBox.hidden = false;
}

function clearError() {
  errorBox.hidden = true;
  errorBox.textContent = '';
}

// Runs `action`; an error is shown, a lost session goes back to the sign-in form.
async function attempt(action) {
  clearError();
  try {
    return await action();
  } catch (e) {
    // A session that ended goes back to the sign-in form (a refused sign-in stays on
    // its form, as typed).
    if (e.code === 'UNAUTHENTICATED' && tokens()) {
      sessionStorage.removeItem(TOKENS);
      route();
    }
    showError(e);
    return undefined;
  }
}

function page(title, ...content) {
  main.replaceChildren(el('div', {}, el('h1', {}, title), ...content));
}

// ---- pages ----------------------------------------------------------------------------------

const RUN_FIELDS = `id status trigger attempt scheduledAt startedAt finishedAt exitCode signal error
  worker task { id name }`;

function signIn() {
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
  page('Sign in', form);
}

function runRow(run, withTask) {
  return el('tr', { 'data-run': run.id },
    el('td', {}, el('a', { href: `#/runs/${run.id}` }, when(run.scheduledAt))),
    withTask ? el('td', {}, el('a', { href: `#/tasks/${run.task.id}` }, run.task.name)) : null,
    el('td', {}, status(run.status)),
    el('td', {}, run.trigger.toLowerCase(), run.attempt ? ` #${run.attempt}` : ''),
    el('td', {}, duration(run)),
    el('td', {}, outcome(run)),
    el('td', {}, run.worker ?? '—'));
}

function runTable(runs, withTask) {
  const body = el('tbody', {}, runs.map((run) => runRow(run, withTask)));
  const table = el('table', { class: 'runs' },
    el('thead', {}, el('tr', {},
      el('th', {}, 'Scheduled'), withTask ? el('th', {}, 'Task') : null, el('th', {}, 'Status'),
      el('th', {}, 'Trigger'), el('th', {}, 'Duration'), el('th', {}, 'Outcome'),
      el('th', {}, 'Worker'))),
    body);
  // A run event replaces the run's row, or adds a new run on top.
  const update = (run) => {
    const row = runRow(run, withTask);
    const old = body.querySelector(`tr[data-run="${CSS.escape(run.id)}"]`);
    if (old) old.replaceWith(row);
    else body.prepend(row);
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

async function tasksPage() {
  const data = await gql(`{ tasks(first: 200) { nodes {
    id name state schedule timezone cluster { name } assignedWorker { name }
    lastRun { id status scheduledAt } nextFireTimes(count: 1)
  } } }`);
  const tasks = data.tasks.nodes;
  if (!tasks.length) {
    page('Tasks', el('p', { class: 'muted' },
      'No tasks yet: create one with the createTask mutation (GraphiQL is at ',
      el('a', { href: '/graphql' }, '/graphql'), ').'));
    return;
  }
  const lastRun = (run) => (run
    ? [status(run.status), ' ', el('a', { href: `#/runs/${run.id}` }, when(run.scheduledAt))]
    : '—');
  const rows = tasks.map((task) => el('tr', { 'data-task': task.id },
    el('td', {}, el('a', { href: `#/tasks/${task.id}` }, task.name)),
    el('td', {}, task.cluster.name),
    el('td', {}, el('code', {}, task.schedule), ' ', el('span', { class: 'muted' }, task.timezone)),
    el('td', {}, status(task.state)),
    el('td', { class: 'last-run' }, lastRun(task.lastRun)),
    el('td', {}, task.state === 'PAUSED' ? '—' : when(task.nextFireTimes[0])),
    el('td', {}, task.assignedWorker?.name ?? '—'),
    el('td', { class: 'actions' }, taskActions(task))));
  page('Tasks', el('table', { class: 'tasks' },
    el('thead', {}, el('tr', {},
      ['Name', 'Cluster', 'Schedule', 'State', 'Last run', 'Next fire', 'Worker', '']
        .map((h) => el('th', {}, h)))),
    el('tbody', {}, rows)));
  live.push(subscribe(`subscription { runEvents { id status scheduledAt task { id } } }`, {},
    ({ runEvents: run }) => {
      const cell = main.querySelector(`tr[data-task="${CSS.escape(run.task.id)}"] .last-run`);
      if (cell) cell.replaceChildren(...[lastRun(run)].flat());
    }));
}

async function taskPage(id) {
  const data = await gql(`query($id: ID!) { task(id: $id) {
    id name description state version schedule timezone command timeoutSeconds overlapPolicy
    misfirePolicy maxRetries labels cluster { name } assignedWorker { name } packageSha256
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
    ['Overlap / misfire', `${task.overlapPolicy} / ${task.misfirePolicy}`],
    ['Retries', String(task.maxRetries)],
    ['Labels', task.labels.join(', ') || '—'],
    ['Version', String(task.version)],
  ];
  const { table, update } = runTable(task.runs.nodes, false);
  page(`Task ${task.name}`,
    task.description ? el('p', {}, task.description) : null,
    el('p', {}, taskActions(task)),
    el('dl', { class: 'facts' }, facts.map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)])),
    el('h2', {}, 'Runs'),
    task.runs.nodes.length ? null : el('p', { class: 'muted' }, 'No runs yet.'),
    table);
  live.push(subscribe(`subscription($t: ID) { runEvents(taskId: $t) { ${RUN_FIELDS} } }`,
    { t: id }, ({ runEvents }) => update(runEvents)));
}

async function runsPage() {
  const data = await gql(`{ runs(first: 100) { nodes { ${RUN_FIELDS} } } }`);
  const { table, update } = runTable(data.runs.nodes, true);
  page('Runs', table);
  live.push(subscribe(`subscription { runEvents { ${RUN_FIELDS} } }`, {},
    ({ runEvents }) => update(runEvents)));
}

// How far along a run is: a late answer never takes a shown run back.
const STAGE = { QUEUED: 0, RUNNING: 1 };
const stage = (run) => STAGE[run.status] ?? 2;

async function runPage(id) {
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
        ['Worker', run.worker ?? '—']]
        .map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)])));
    stop.hidden = !ongoing(run);
  };
  const refresh = () => load().then(show, () => {});
  show(run);
  const logs = el('pre', { class: 'logs', 'aria-live': 'polite' });
  page('Run', head, el('p', {}, stop), el('h2', {}, 'Output'), logs);
  const shown = () => main.contains(logs);

  // Status changes come as run events; a change made before the subscription took hold
  // is caught by reading the run again when its output starts or ends, and every few
  // seconds while it is going.
  live.push(subscribe(`subscription($t: ID) { runEvents(taskId: $t) { ${RUN_FIELDS} } }`,
    { t: run.task.id }, ({ runEvents }) => show(runEvents)));
  const poll = setInterval(() => { if (!shown()) clearInterval(poll); else if (ongoing(run)) refresh(); }, 5000);
  live.push(() => clearInterval(poll));

  // Lines from the start, then live; after a dropped socket, on from the next offset.
  let next = 0;
  const follow = () => {
    live.push(subscribe(
      `subscription($r: ID!, $from: Int) { runLogs(runId: $r, fromOffset: $from) { offset stream text } }`,
      { r: id, from: next },
      ({ runLogs: line }) => {
        if (line.offset < next) return;
        if (run.status === 'QUEUED') refresh();
        next = line.offset + 1;
        const atBottom = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
        logs.append(el('span', { class: `line ${line.stream}` }, line.text));
        if (atBottom) logs.scrollTop = logs.scrollHeight;
      },
      (why) => {
        if (why === 'complete') {
          logs.append(el('span', { class: 'line end' }, '— end of output —'));
          refresh();
        } else if (why === 'refused') {
          renew().then((renewed) => { if (renewed && shown()) follow(); });
        } else if (why === 'closed' && shown()) {
          setTimeout(() => { if (shown()) follow(); }, 1000);
        }
      }));
  };
  follow();
}

async function clustersPage() {
  const data = await gql(`{ clusters { id name workers {
    name online hostname labels assignedTaskCount startedAt
  } } }`);
  const sections = data.clusters.map((cluster) => [
    el('h2', {}, cluster.name),
    cluster.workers.length
      ? el('table', { class: 'workers' },
        el('thead', {}, el('tr', {},
          ['Worker', 'State', 'Host', 'Labels', 'Tasks', 'Started'].map((h) => el('th', {}, h)))),
        el('tbody', {}, cluster.workers.map((w) => el('tr', {},
          el('td', {}, w.name),
          el('td', {}, status(w.online ? 'online' : 'offline')),
          el('td', {}, w.hostname ?? '—'),
          el('td', {}, w.labels.join(', ') || '—'),
          el('td', {}, String(w.assignedTaskCount)),
          el('td', {}, when(w.startedAt))))))
      : el('p', { class: 'muted' }, 'No workers have joined.'),
  ]);
  page('Clusters', data.clusters.length ? sections : el('p', { class: 'muted' }, 'No clusters yet.'));
}

// ---- routing --------------------------------------------------------------------------------

const routes = [
  [/^#\/tasks\/([\w-]+)$/, taskPage],
  [/^#\/runs\/([\w-]+)$/, runPage],
  [/^#\/runs$/, runsPage],
  [/^#\/clusters$/, clustersPage],
  [/^/, tasksPage],
];

function route() {
  closeLive();
  const held = tokens();
  document.getElementById('nav').hidden = !held;
  document.getElementById('sign-out').hidden = !held;
  document.getElementById('who').textContent = held
    ? `${held.email}${held.tenant ? ` · ${held.tenant}` : ''}` : '';
  if (!held) {
    signIn();
    return;
  }
  const hash = location.hash || '#/tasks';
  for (const [pattern, show] of routes) {
    const match = hash.match(pattern);
    if (match) {
      attempt(() => show(...match.slice(1)));
      return;
    }
  }
}

document.getElementById('sign-out').addEventListener('click', async () => {
  const held = tokens();
  sessionStorage.removeItem(TOKENS);
  if (held) {
    await post(`mutation($t: String!) { logout(refreshToken: $t) }`, { t: held.refresh }, held.access)
      .catch(() => {});
  }
  location.hash = '#/sign-in';
  route();
});
window.addEventListener('hashchange', route);
route();
