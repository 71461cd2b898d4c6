// Drives the console in headless Chromium against a live API (started by the Rust test
// `console` in tests/it, which also starts a worker, creates the tasks and checks what
// ended up in the catalogue). Talks to that test through lines: it prints `waiting-for-go`
// once the first run's first line is on screen while the run is still going (the test
// then lets the run go on), and `waiting-for-w2` on the clusters page (the test then
// starts a second worker, which the page shows as it joins).
//
// Environment: CONSOLE_URL, CONSOLE_EMAIL, CONSOLE_PASSWORD, CONSOLE_PACKAGE (a tar.gz
// with hello.sh in it, for the task it creates); optional: CHROMIUM (the
// browser), CONSOLE_SCREENSHOTS (a folder to save the pages in, to look at them).
import { chromium } from 'playwright-core';

const { CONSOLE_URL, CONSOLE_EMAIL, CONSOLE_PASSWORD } = process.env;
const STEP = 20_000;

async function snap(page, name) {
  const folder = process.env.CONSOLE_SCREENSHOTS;
  if (folder) await page.screenshot({ path: `${folder}/${name}.png`, fullPage: true });
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
let page;
try {
  const context = await browser.newContext();
  page = await context.newPage();
  page.setDefaultTimeout(STEP);
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });

  // A wrong password is refused with the API's code, and nothing else shows.
  await page.goto(CONSOLE_URL);
  await page.fill('input[name=email]', CONSOLE_EMAIL);
  await page.fill('input[name=password]', 'not the password');
  await page.click('button[type=submit]');
  await page.locator('#error').filter({ hasText: 'UNAUTHENTICATED' }).waitFor();
  check(await page.locator('#nav').isHidden(), 'the navigation shows before signing in');
  // The browser logs the refused request (401) itself; nothing else is expected.
  const refused = problems.findIndex((p) => p.includes('401'));
  if (refused >= 0) problems.splice(refused, 1);

  // Signed in: the tasks, with what the API says of them.
  await page.fill('input[name=password]', CONSOLE_PASSWORD);
  await page.click('button[type=submit]');
  const demo = page.locator('tr[data-task]', { hasText: 'console-demo' });
  await demo.waitFor();
  check((await demo.textContent()).includes('0 0 1 1 *'), 'the task row shows no schedule');
  check(await page.locator('#error').isHidden(), 'an error shows after signing in');
  await snap(page, 'tasks');

  // The description is shown as text, never as markup.
  await demo.locator('a', { hasText: 'console-demo' }).click();
  await page.locator('h1', { hasText: 'Task console-demo' }).waitFor();
  await page.locator('main p', { hasText: '<b>not bold</b>' }).waitFor();
  check(await page.locator('main b').count() === 0, 'the description was rendered as HTML');

  // Run now: the run's page follows it live.
  await page.click('button:has-text("Run now")');
  await page.locator('h1', { hasText: 'Run' }).waitFor();
  await page.locator('.logs .STDOUT', { hasText: 'first' }).waitFor();
  // The run cannot go on before the test lets it: this is the run live, not its record.
  await page.locator('dd [data-status="RUNNING"]').waitFor();
  check(await page.locator('.logs .STDERR').count() === 0, 'the second line showed too soon');
  console.log('waiting-for-go');

  await page.locator('.logs .STDERR', { hasText: 'second' }).waitFor();
  await page.locator('dd [data-status="FAILED"]').waitFor();
  await page.locator('dd', { hasText: 'exit 3' }).waitFor();
  await page.locator('.logs .end').waitFor();
  const lines = await page.locator('.logs .line:not(.SYSTEM):not(.end)').allTextContents();
  check(JSON.stringify(lines) === '["first","second"]', `the output shown: ${JSON.stringify(lines)}`);
  await snap(page, 'run');
  check(await page.locator('button:has-text("Stop")').isHidden(), 'Stop shows on an ended run');

  // The task's page lists the run, as it ended.
  await page.click('dd a:has-text("console-demo")');
  await page.locator('table.runs tr[data-run] [data-status="FAILED"]').waitFor();
  await snap(page, 'task');

  // Stop: a long run of the other task ends STOPPED.
  await page.click('nav a:has-text("Tasks")');
  const sleeper = page.locator('tr[data-task]', { hasText: 'console-sleeper' });
  await sleeper.locator('button:has-text("Run now")').click();
  await page.locator('dd [data-status="RUNNING"]').waitFor();
  await page.click('button:has-text("Stop")');
  await page.locator('dd [data-status="STOPPED"]').waitFor();

  // An access token the API no longer takes is renewed with the refresh token (which
  // rotates) and the page loads; a second tab shares the session.
  const stored = () => page.evaluate(() => JSON.parse(localStorage.getItem('cloudtask.tokens')));
  const before = await stored();
  await page.evaluate(() => {
    const held = JSON.parse(localStorage.getItem('cloudtask.tokens'));
    localStorage.setItem('cloudtask.tokens', JSON.stringify({ ...held, access: 'expired' }));
  });
  await page.click('nav a:has-text("Runs")');
  await page.locator('table.runs tr[data-run] [data-status="STOPPED"]').waitFor();
  const after = await stored();
  check(after.access !== 'expired' && after.refresh !== before.refresh,
    `the refresh token was not spent for a new pair: ${JSON.stringify([before, after])}`);
  check(await page.locator('#error').isHidden(), 'an error shows after the renewal');
  const second = await context.newPage();
  await second.goto(`${CONSOLE_URL}#/runs`);
  await second.locator('table.runs tr[data-run] [data-status="FAILED"]').waitFor();
  await second.close();

  // A new task with a package, after a schedule the API refuses (the form keeps what was
  // typed, and the error names the field).
  await page.click('nav a:has-text("Tasks")');
  await page.click('a:has-text("New task")');
  await page.fill('input[name=name]', 'console-made');
  await page.fill('input[name=schedule]', 'every tuesday');
  await page.fill('input[name=command]', './hello.sh');
  await page.setInputFiles('input[name=package]', process.env.CONSOLE_PACKAGE);
  await page.click('button:has-text("Create task")');
  await page.locator('#error').filter({ hasText: 'BAD_USER_INPUT' }).waitFor();
  check((await page.locator('#error').textContent()).includes('schedule'),
    'the refusal does not name the schedule');
  await snap(page, 'new-task-refused');
  await page.fill('input[name=schedule]', '0 0 1 1 *');
  await page.fill('input[name=timezone]', 'Europe/Paris');
  await page.click('button:has-text("Create task")');
  await page.locator('h1', { hasText: 'Task console-made' }).waitFor();
  check((await page.locator('dl.facts').textContent()).includes('Europe/Paris'),
    'the new task shows no timezone');
  await page.locator('dd code').filter({ hasText: /^[0-9a-f]{12}$/ }).waitFor();
  await snap(page, 'new-task');
  // Its package runs (queued until the task has its worker, if it has none yet).
  await page.click('button:has-text("Run now")');
  await page.locator('.logs .STDOUT', { hasText: 'hello from the package' }).waitFor();
  await page.locator('dd [data-status="SUCCEEDED"]').waitFor();

  // The clusters page shows the worker online.
  await page.click('nav a:has-text("Clusters")');
  await page.locator('tr[data-worker="w1"] [data-status="online"]').waitFor();
  // A worker that joins shows up live.
  console.log('waiting-for-w2');
  await page.locator('tr[data-worker="w2"] [data-status="online"]').waitFor();

  // Signing out leaves the sign-in form.
  await page.click('#sign-out');
  await page.locator('input[name=password]').waitFor();

  check(problems.length === 0, `the page reported problems:\n${problems.join('\n')}`);
  console.log('ok');
} catch (e) {
  // What the page showed when it went wrong.
  const shown = page && await page.evaluate(() => [
    location.href, document.getElementById('error').textContent, document.body.innerText,
  ].join('\n')).catch(() => '');
  console.error(`${e.stack}\n--- the page:\n${shown}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
