// Drives the operator console (/console) in headless Chromium like an
// operator would, against real hosts (scripts/console-browser-test.sh):
//
// 1. log in (anonymous -> login page -> overview);
// 2. watch an order placed through the API go pending -> processing ->
//    completed on its instance page, without a reload (the runner is
//    paused with SIGSTOP while the order is placed, so that it stays
//    pending until the page has shown it, then continued with SIGCONT);
// 3. open the parked order, read its error, resume it, watch it complete;
// 4. re-drive its dead letter from the overview: counts before and after;
// 5. the operator-action log lists both, with the operator;
// and everywhere: a product name and an error text made of markup show as
// text; no dialog opens, no injected script runs, the CSP reports nothing.
//
// Environment: BASE_URL, ADMIN_EMAIL, ADMIN_PASSWORD, TOKEN (an admin's
// bearer token for the API), PARKED_ID, RUNNER_PID, PRODUCT_NAME, HOSTILE_ERROR, OUT
// (screenshot folder), CHROMIUM (default /usr/bin/chromium).
import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) {
    console.error(`console browser test: set ${name}`);
    process.exit(2);
  }
  return value;
};
const base = env('BASE_URL');
const adminEmail = env('ADMIN_EMAIL');
const adminPassword = env('ADMIN_PASSWORD');
const token = env('TOKEN');
const parkedId = env('PARKED_ID');
const runnerPid = Number(env('RUNNER_PID'));
const productName = env('PRODUCT_NAME');
const hostileError = env('HOSTILE_ERROR');
const out = process.env.OUT ?? '.';
const say = (...args) => console.log('console test:', ...args);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
page.setDefaultTimeout(20_000);

// Anything an injected script would do, and anything the CSP refused.
const dialogs = [];
const problems = [];
let loggedIn = false;
page.on('dialog', async (dialog) => {
  dialogs.push(`${dialog.type()}: ${dialog.message()}`);
  await dialog.dismiss();
});
page.on('console', (message) => {
  const text = message.text();
  if (/Content Security Policy|Refused to/i.test(text)) problems.push(text);
  // Before logging in, the wrong password's 401 page is expected.
  if (message.type() === 'error' && loggedIn) problems.push(text);
});
page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));

const shot = async (name) => {
  const path = `${out}/console-${name}.png`;
  await page.screenshot({ path, fullPage: false });
  say('screenshot', path);
};
const text = (selector) => page.locator(selector).first().textContent();
const expectEqual = (what, actual, wanted) => {
  if (actual !== wanted) throw new Error(`${what}: expected ${JSON.stringify(wanted)}, got ${JSON.stringify(actual)}`);
};
// No injected element, no script side effect, no dialog.
const assertInert = async (where) => {
  const found = await page.evaluate(() => ({
    pwned: window.__pwned ?? null,
    bodyScripts: document.querySelectorAll('body script').length,
    images: [...document.querySelectorAll('main img')].filter((i) => !i.classList.contains('chart')).length,
  }));
  if (found.pwned !== null || found.bodyScripts !== 0 || found.images !== 0 || dialogs.length !== 0) {
    throw new Error(`${where}: injected markup took effect: ${JSON.stringify({ ...found, dialogs })}`);
  }
};
// Waits until the page's script has refreshed it `n` more times.
const refreshes = async (n) => {
  const now = Number(await page.evaluate(() => document.body.dataset.refreshed ?? '0'));
  await page.waitForFunction((want) => Number(document.body.dataset.refreshed ?? '0') >= want, now + n);
};
// Records every state #state shows, and marks the document to detect reloads.
const watchState = () => page.evaluate(() => {
  window.__noReload = true;
  window.__states = [document.getElementById('state').textContent];
  new MutationObserver(() => {
    const s = document.getElementById('state').textContent;
    if (window.__states[window.__states.length - 1] !== s) window.__states.push(s);
  }).observe(document.getElementById('state'), { childList: true, characterData: true, subtree: true });
});
const waitForState = async (state, timeout) => {
  await page.waitForFunction((s) => document.getElementById('state').textContent === s, state, { timeout });
  return page.evaluate(() => ({ states: window.__states, noReload: window.__noReload === true }));
};

let failed = false;
try {
  // 1. Log in.
  await page.goto(`${base}/console`);
  expectEqual('anonymous users land on', new URL(page.url()).pathname, '/console/login');
  await page.fill('input[name=email]', adminEmail);
  await page.fill('input[name=password]', 'not the password');
  await page.click('form.login button[type=submit]');
  expectEqual('wrong password says', (await text('#login-error')).trim(), 'E-mail or password is wrong.');
  await shot('login');
  await page.fill('input[name=password]', adminPassword);
  await page.click('form.login button[type=submit]');
  await page.waitForURL(`${base}/console`);
  expectEqual('logged in as', await text('#who'), adminEmail);
  loggedIn = true;
  say('logged in as', adminEmail);

  // The overview shows the parked order with its error as text, also after
  // the script has refreshed the table.
  const parkedCell = `#parked tr:has(td.c-correlation_id a:text-is("${parkedId}")) td.c-last_error`;
  expectEqual('the parked order\'s error on the overview', await text(parkedCell), hostileError);
  await refreshes(1);
  expectEqual('the parked order\'s error after a refresh', await text(parkedCell), hostileError);
  await assertInert('overview');

  // 2. Watch an order complete without a reload. The runner is paused
  // while the order is placed, so the page can show it pending.
  process.kill(runnerPid, 'SIGSTOP');
  let order;
  try {
    const placed = await fetch(`${base}/api/orders`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: JSON.stringify({ items: [{ product_id: 1, quantity: 1 }] }),
    });
    if (placed.status !== 201) throw new Error(`placing an order: HTTP ${placed.status}`);
    order = (await placed.json()).id;
    await page.goto(`${base}/console/instances/order/${order}`);
    await watchState();
    say(`order ${order} opened in state`, await text('#state'));
    await refreshes(1);
  } finally {
    process.kill(runnerPid, 'SIGCONT');
  }
  const watched = await waitForState('completed', 30_000);
  say(`order ${order} seen in states`, watched.states.join(' -> '), watched.noReload ? '(no reload)' : '(RELOADED)');
  if (!watched.noReload) throw new Error('the page reloaded');
  expectEqual('states seen', watched.states.join(' -> '), 'pending -> processing -> completed');
  await page.waitForFunction(() => [...document.querySelectorAll('#journal td.c-trigger')].some((td) => td.textContent === 'PaymentDecided'));
  const current = await page.evaluate(() => [...document.querySelectorAll('#diagram g.state.current')].map((g) => g.dataset.state));
  expectEqual('highlighted in the diagram', current.join(','), 'completed');
  await shot('order-completed');

  // 3. The parked order: its error and product name as text; resume it.
  await page.goto(`${base}/console/instances?parked=true`);
  await page.click(`#instances a:text-is("${parkedId}")`);
  await page.waitForURL(`${base}/console/instances/order/${parkedId}`);
  expectEqual('parked flag shown', await page.locator('#parked-flag').isVisible(), true);
  expectEqual('error text', await text('#last-error'), hostileError);
  const data = await text('#data');
  if (!data.includes(JSON.stringify(productName))) throw new Error(`product name not shown as text: ${data}`);
  const outboxBody = await text('#outbox td.c-body');
  if (!outboxBody.includes(productName.replaceAll('"', '\\"'))) throw new Error(`outbox event: ${outboxBody}`);
  await refreshes(1);
  expectEqual('error text after a refresh', await text('#last-error'), hostileError);
  await assertInert('parked instance');
  await shot('parked');
  await page.click('#resume');
  await page.waitForURL(`${base}/console/instances/order/${parkedId}`);
  await watchState();
  const resumed = await waitForState('completed', 30_000);
  say(`resumed order ${parkedId}, seen in states`, resumed.states.join(' -> '));
  expectEqual('parked flag after resuming', await page.locator('#parked-flag').isVisible(), false);
  const resumedRow = page.locator('#journal tr.outcome-resumed');
  const resumedInput = await resumedRow.locator('td.c-input').textContent();
  if (!resumedInput.includes(adminEmail)) throw new Error(`the resumed row does not name the operator: ${resumedInput}`);
  say('journal: resumed by', JSON.parse(resumedInput).operator);
  await assertInert('resumed instance');
  // The picture in the README: the diagram and the timeline with the resume.
  await page.setViewportSize({ width: 1280, height: 1280 });
  await shot('resumed');
  await page.setViewportSize({ width: 1280, height: 900 });

  // 4. Re-drive the dead letter from the overview.
  await page.goto(`${base}/console`);
  const errorDepth = '#queues tr[data-consumer="order-saga"]:not(.problem) td.error-depth';
  await page.waitForFunction((s) => document.querySelector(s)?.textContent === '1', errorDepth);
  await shot('overview');
  await page.click('#queues tr[data-consumer="order-saga"]:not(.problem) button.redrive');
  await page.waitForURL(/\/console\/actions\/\d+$/);
  const before = await text('#before td.error-queue');
  const after = await text('#after td.error-queue');
  const moved = await text('#moved');
  say(`re-drive: error queue ${before} before, ${after} after; moved ${moved}`);
  expectEqual('dead letters before', before, '1');
  expectEqual('dead letters after', after, '0');
  expectEqual('moved', moved, '1');
  expectEqual('operator', await text('#operator'), `${adminEmail} (user 1)`);
  await shot('redrive');
  // The re-driven OrderCreated reaches the resumed saga, which ignores it.
  await page.goto(`${base}/console/instances/order/${parkedId}`);
  await page.waitForFunction(
    () => [...document.querySelectorAll('#journal tr.outcome-ignored td.c-trigger')].some((td) => td.textContent === 'OrderCreated'),
    null,
    { timeout: 20_000 },
  );
  say('the re-driven OrderCreated was journalled as ignored');

  // 5. The operator-action log.
  await page.goto(`${base}/console/actions`);
  const actions = await page.evaluate(() => [...document.querySelectorAll('#actions tbody tr')].map((tr) => ({
    action: tr.querySelector('td.c-action')?.textContent,
    operator: tr.querySelector('td.c-operator')?.textContent,
  })));
  expectEqual('logged actions', actions.map((a) => a.action).join(','), 'redrive,resume');
  if (!actions.every((a) => a.operator === `${adminEmail} (user 1)`)) throw new Error(`operators: ${JSON.stringify(actions)}`);
  await shot('actions');
  await assertInert('actions');
  if (problems.length !== 0) throw new Error(`browser reported: ${problems.join(' | ')}`);
  say('no dialog opened, no injected markup ran, no CSP report');
} catch (e) {
  failed = true;
  console.error('console browser test FAILED:', e.message);
  await shot('failure').catch(() => {});
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
