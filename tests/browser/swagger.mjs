// Drives the API's Swagger UI in headless Chromium like a person would:
// open /swagger, press Authorize and paste a token, open POST /api/orders,
// "Try it out", "Execute", and expect a 201 with a pending order. Saves a
// screenshot either way.
//
// Environment: BASE_URL (e.g. http://127.0.0.1:8080), TOKEN (a bearer token),
// SCREENSHOT (where to save the PNG), CHROMIUM (default /usr/bin/chromium).
import { chromium } from 'playwright-core';

const base = process.env.BASE_URL;
const token = process.env.TOKEN;
const screenshot = process.env.SCREENSHOT ?? 'swagger-order-201.png';
if (!base || !token) {
  console.error('browser test: set BASE_URL and TOKEN');
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});

let failed = false;
const page = await browser.newPage({ viewport: { width: 1280, height: 1600 } });
page.setDefaultTimeout(20_000);
try {
  await page.goto(`${base}/swagger`);
  await page.locator('.swagger-ui .info .title').waitFor();
  console.log('browser test: Swagger UI loaded:', (await page.locator('.info .title').innerText()).split('\n')[0]);

  // Authorize with the bearer token.
  await page.locator('button.authorize').first().click();
  const modal = page.locator('.modal-ux');
  await modal.locator('input[type=text], input:not([type])').first().fill(token);
  await modal.locator('button.authorize').click();
  await modal.locator('button.btn-done, button.close-modal').first().click();
  await modal.waitFor({ state: 'detached' });
  console.log('browser test: authorized');

  // POST /api/orders -> Try it out -> Execute.
  const op = page.locator('.opblock.opblock-post', {
    has: page.locator('.opblock-summary-path[data-path="/api/orders"]'),
  });
  await op.locator('.opblock-summary').first().click();
  await op.locator('button.try-out__btn').click();
  const body = op.locator('textarea.body-param__text');
  await body.waitFor();
  const example = await body.inputValue();
  console.log('browser test: request body:', example.replace(/\s+/g, ' '));
  await op.locator('button.execute').click();

  const status = op.locator('.live-responses-table .response .response-col_status').first();
  await status.waitFor();
  const code = (await status.innerText()).trim();
  const responseBody = await op
    .locator('.live-responses-table .response-col_description .microlight, .live-responses-table pre')
    .first()
    .innerText();
  console.log(`browser test: response ${code}:`, responseBody.replace(/\s+/g, ' ').slice(0, 300));
  await status.scrollIntoViewIfNeeded();
  if (!code.startsWith('201')) {
    throw new Error(`expected 201 Created, got ${code}`);
  }
  const order = JSON.parse(responseBody);
  if (order.status !== 'pending' || !Number.isInteger(order.id)) {
    throw new Error(`unexpected order: ${responseBody}`);
  }
  console.log(`browser test: order ${order.id} placed through Swagger UI (status ${order.status})`);
} catch (e) {
  failed = true;
  console.error('browser test FAILED:', e.message);
} finally {
  await page.screenshot({ path: screenshot, fullPage: false });
  console.log('browser test: screenshot saved to', screenshot);
  await browser.close();
}
process.exit(failed ? 1 : 0);
