// Drive JupyterLab with the Sandbox kernel in headless Chromium, as a person would:
// open the notebook, run a cell that is blocked, see the notice, open `%sandbox policy`,
// click Allow for the blocked destination, run the cell again and see it succeed.
//
// Started by tests/browser/test_lab.py with one argument, a JSON object:
//   {url, notebook, host, port, shots, userDataDir, executablePath, timeoutMs}
// Prints one JSON object on stdout (what it saw; "ok": false and "error" on failure) and
// exits 0 on success, 1 on failure. Chromium may reach 127.0.0.1 only: every other host
// name fails to resolve (--host-resolver-rules) and every request that leaves loopback is
// reported in "offLoopback".
import { chromium } from 'playwright-core';
import path from 'node:path';

const cfg = JSON.parse(process.argv[2]);
const timeout = cfg.timeoutMs ?? 45000;
// loading JupyterLab and starting the kernel take longest on a busy machine
const slow = Math.max(timeout, 90000);
const allowCommand = `%sandbox allow ${cfg.host}:${cfg.port}/tcp`;
const report = { ok: false, steps: [], screenshots: {}, offLoopback: [], consoleErrors: [], timings: {} };
const started = Date.now();
const step = (name) => { report.steps.push(name); report.timings[name] = Date.now() - started; };

const isLoopback = (url) => {
  try {
    const u = new URL(url);
    if (!/^(https?|wss?):$/.test(u.protocol)) return true; // data:, blob:, about:
    return ['127.0.0.1', 'localhost', '[::1]'].includes(u.hostname);
  } catch { return true; }
};

let context;
try {
  context = await chromium.launchPersistentContext(cfg.userDataDir, {
    executablePath: cfg.executablePath ?? '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1280, height: 900 },
    timeout,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--disable-default-apps', '--disable-domain-reliability', '--no-pings',
      // loopback only: no proxy from the environment, no name resolves but 127.0.0.1
      // (Chromium still connect()s a UDP socket to a public IPv6 address to probe for IPv6
      // routes; that sends no packet)
      '--no-proxy-server', '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
    ],
  });
  context.setDefaultTimeout(timeout);
  context.on('request', (req) => { if (!isLoopback(req.url())) report.offLoopback.push(req.url()); });
  const page = context.pages()[0] ?? await context.newPage();
  page.on('websocket', (ws) => { if (!isLoopback(ws.url())) report.offLoopback.push(ws.url()); });
  page.on('console', (msg) => { if (msg.type() === 'error') report.consoleErrors.push(msg.text().slice(0, 300)); });
  page.on('pageerror', (err) => report.consoleErrors.push(`pageerror: ${String(err).slice(0, 300)}`));

  const shot = async (name) => {
    const file = path.join(cfg.shots, `${name}.png`);
    await page.screenshot({ path: file });
    report.screenshots[name] = file;
  };

  // -- open the notebook; the Sandbox kernel starts from its metadata --------------------
  await page.goto(`${cfg.url}lab/tree/${encodeURIComponent(cfg.notebook)}?reset&token=${cfg.token}`, { timeout: slow });
  const panel = page.locator('.jp-NotebookPanel').filter({ has: page.locator('.jp-Cell') }).first();
  await panel.waitFor({ timeout: slow });
  step('notebook open');
  const cells = panel.locator('.jp-Notebook .jp-Cell');
  await cells.nth(1).waitFor();

  // If JupyterLab asks for a kernel (it should not: the notebook names it), choose Sandbox.
  const kernelName = panel.locator('.jp-KernelName, .jp-Toolbar-kernelName').first();
  const dialog = page.locator('.jp-Dialog');
  await Promise.race([
    kernelName.filter({ hasText: 'Sandbox' }).waitFor(),
    dialog.waitFor().then(async () => {
      const select = dialog.locator('select');
      if (await select.count()) {
        await select.selectOption({ label: 'Sandbox' });
      }
      await dialog.locator('.jp-mod-accept').click();
    }),
  ]);
  await kernelName.filter({ hasText: 'Sandbox' }).waitFor();
  report.kernelName = (await kernelName.innerText()).trim();
  // idle: the kernel started and its sandbox is up
  const idle = panel.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]');
  await idle.waitFor({ timeout: slow });
  step('kernel idle');

  // A narrower window for the screenshots: collapse the left sidebar.
  const leftTab = page.locator('.jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current');
  if (await leftTab.count()) {
    await leftTab.click();
    await page.locator('#jp-left-stack').waitFor({ state: 'hidden' });
  }

  const runCell = async (i) => {
    const cell = cells.nth(i);
    await cell.locator('.jp-InputArea-editor').click();
    await page.keyboard.press('Shift+Enter');
  };
  const prompt = (i) => cells.nth(i).locator('.jp-InputArea-prompt');

  // -- cell 1: blocked under default-deny, a notice appears ------------------------------
  await runCell(0);
  const notice = cells.nth(0).locator('.sandbox-kernel-notice');
  await notice.filter({ hasText: 'egress blocked' }).waitFor();
  await prompt(0).filter({ hasText: /\[\d+\]/ }).waitFor();
  await idle.waitFor();
  report.notice = (await notice.first().innerText()).trim();
  report.cell1Blocked = (await cells.nth(0).locator('.jp-Cell-outputArea').innerText()).trim();
  await cells.nth(0).scrollIntoViewIfNeeded();
  await shot('notice');
  step('notice shown');

  // -- cell 2: %sandbox policy, the panel ------------------------------------------------
  await runCell(1);
  const widget = cells.nth(1).locator('.jupyter-widgets').filter({ hasText: 'Sandbox egress policy' }).first();
  await widget.waitFor();
  const allow = cells.nth(1).locator(`button.jupyter-button[title="${allowCommand}"]`);
  await allow.waitFor();
  await idle.waitFor();
  report.panelBefore = (await cells.nth(1).locator('.jp-Cell-outputArea').innerText()).trim();
  report.allowDisabled = await allow.isDisabled();
  step('panel shown');

  // -- click Allow for the blocked destination --------------------------------------------
  await allow.click();
  const status = cells.nth(1).locator('.sk-enforced').filter({ hasText: 'egress now: allowlist' });
  await status.waitFor();
  report.panelStatus = (await status.innerText()).trim();
  report.panelTitle = (await cells.nth(1).locator('.widget-html-content').first().innerText()).trim();
  report.panelEntries = await cells.nth(1).locator('textarea').first().inputValue();
  await cells.nth(1).scrollIntoViewIfNeeded();
  await shot('panel');
  step('allowed in panel');

  // -- cell 1 again: it reaches the test host ----------------------------------------------
  const countBefore = (await prompt(0).innerText()).trim();
  await runCell(0);
  await prompt(0).filter({ hasText: /\[\d+\]/ }).filter({ hasNotText: countBefore }).waitFor();
  await cells.nth(0).locator('.jp-OutputArea-output').filter({ hasText: 'hello from test host' }).waitFor();
  await idle.waitFor();
  report.cell1Allowed = (await cells.nth(0).locator('.jp-Cell-outputArea').innerText()).trim();
  report.noticeAfter = await cells.nth(0).locator('.sandbox-kernel-notice').count();
  await cells.nth(0).scrollIntoViewIfNeeded();
  await shot('allowed');
  step('cell succeeded');
  report.ok = true;
} catch (err) {
  report.error = String(err && err.stack || err).slice(0, 4000);
  try {
    const page = context?.pages()[0];
    if (page) {
      report.pageUrl = page.url().replace(/token=[^&]*/, 'token=…');
      report.pageText = (await page.locator('body').innerText({ timeout: 5000 })).slice(0, 1500);
      const file = path.join(cfg.failureDir ?? cfg.shots, 'failure.png');
      await page.screenshot({ path: file, timeout: 5000 });
      report.screenshots.failure = file;
    }
  } catch { /* the browser is gone */ }
} finally {
  report.seconds = (Date.now() - started) / 1000;
  try { await context?.close(); } catch { /* already closed */ }
  process.stdout.write(JSON.stringify(report) + '\n');
  process.exitCode = report.ok ? 0 : 1;
}
