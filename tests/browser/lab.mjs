// What the browser scripts of tests/browser share: a headless Chromium that may reach loopback
// only, the report each script prints as one JSON object, and JupyterLab's notebook page.
//
// A script builds its report with newReport(), launches the browser with launchLoopback(),
// opens the notebook with openNotebook(), and ends with recordFailure() in its catch and
// finish() in its finally.
import { chromium } from 'playwright-core';
import path from 'node:path';

// data:, blob:, about: and anything that is not a URL count as loopback (they leave nothing)
export const isLoopback = (url) => {
  try {
    const u = new URL(url);
    if (!/^(https?|wss?):$/.test(u.protocol)) return true;
    return ['127.0.0.1', 'localhost', '[::1]'].includes(u.hostname);
  } catch { return true; }
};

export const hideToken = (url) => url.replace(/token=[^&]*/, 'token=…');

// The fields every script reports, and the script's own (initial values) after them.
export const newReport = (own = {}) => ({
  ok: false, steps: [], screenshots: {}, offLoopback: [], consoleErrors: [], ...own,
});

// cfg: {userDataDir, executablePath, timeoutMs}. Every host name but 127.0.0.1 fails to
// resolve and no proxy is taken from the environment (Chromium still connect()s a UDP socket
// to a public IPv6 address to probe for IPv6 routes; that sends no packet). Each request and
// websocket that leaves loopback is put in report.offLoopback, the page's errors in
// report.consoleErrors. Returns {context, page}.
export async function launchLoopback(cfg, report, viewport) {
  const timeout = cfg.timeoutMs ?? 45000;
  const context = await chromium.launchPersistentContext(cfg.userDataDir, {
    executablePath: cfg.executablePath ?? '/usr/bin/chromium',
    headless: true,
    viewport,
    timeout,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--disable-default-apps', '--disable-domain-reliability', '--no-pings',
      '--no-proxy-server', '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
    ],
  });
  try {
    context.setDefaultTimeout(timeout);
    context.on('request', (req) => { if (!isLoopback(req.url())) report.offLoopback.push(req.url()); });
    const page = context.pages()[0] ?? await context.newPage();
    page.on('websocket', (ws) => { if (!isLoopback(ws.url())) report.offLoopback.push(ws.url()); });
    page.on('console', (msg) => { if (msg.type() === 'error') report.consoleErrors.push(msg.text().slice(0, 300)); });
    page.on('pageerror', (err) => report.consoleErrors.push(`pageerror: ${String(err).slice(0, 300)}`));
    return { context, page };
  } catch (err) {
    await context.close().catch(() => {});
    throw err;
  }
}

// Open cfg.notebook in JupyterLab (cfg: {url, token, notebook}); waits, up to `slow` ms, for
// the notebook's panel. Returns its locators and the two things done to a cell.
export async function openNotebook(page, cfg, slow) {
  await page.goto(`${cfg.url}lab/tree/${encodeURIComponent(cfg.notebook)}?reset&token=${cfg.token}`, { timeout: slow });
  const panel = page.locator('.jp-NotebookPanel').filter({ has: page.locator('.jp-Cell') }).first();
  await panel.waitFor({ timeout: slow });
  const cells = panel.locator('.jp-Notebook .jp-Cell');
  return {
    panel,
    cells,
    kernelName: panel.locator('.jp-KernelName, .jp-Toolbar-kernelName').first(),
    idle: panel.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]'),
    prompt: (i) => cells.nth(i).locator('.jp-InputArea-prompt'),
    // as a person does it: click into the cell, Shift+Enter
    runCell: async (i) => {
      await cells.nth(i).locator('.jp-InputArea-editor').click();
      await page.keyboard.press('Shift+Enter');
    },
  };
}

// A narrower window for the screenshots: collapse the left sidebar.
export async function collapseLeftSidebar(page) {
  const leftTab = page.locator('.jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current');
  if (await leftTab.count()) {
    await leftTab.click();
    await page.locator('#jp-left-stack').waitFor({ state: 'hidden' });
  }
}

export async function shot(page, report, name, file) {
  await page.screenshot({ path: file });
  report.screenshots[name] = file;
}

// In a script's catch: the error, where the page was, its text and a screenshot
// (failure.png in cfg.failureDir, else cfg.shots). `more(page)` adds the script's own.
export async function recordFailure(report, context, cfg, err, more = async () => {}) {
  report.error = String(err && err.stack || err).slice(0, 4000);
  try {
    const page = context?.pages()[0];
    if (page) {
      await more(page);
      report.pageUrl = hideToken(page.url());
      report.pageText = (await page.locator('body').innerText({ timeout: 5000 })).slice(0, 2000);
      const file = path.join(cfg.failureDir ?? cfg.shots, 'failure.png');
      await page.screenshot({ path: file, timeout: 5000 });
      report.screenshots.failure = file;
    }
  } catch { /* the browser is gone */ }
}

// In a script's finally: close the browser, print the report, exit 0 only if it got through.
export async function finish(report, context, started) {
  report.seconds = (Date.now() - started) / 1000;
  try { await context?.close(); } catch { /* already closed */ }
  process.stdout.write(JSON.stringify(report) + '\n');
  process.exitCode = report.ok ? 0 : 1;
}
