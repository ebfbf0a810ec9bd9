// The sandbox service's admin page in headless Chromium, as a teacher would use it: log in to
// the hub, open /services/<name>/admin (the service sends the browser through the hub's OAuth
// and back), read the sandboxes and the audit log, put a group in exam mode with the form.
// Then a student logs in and opens the same page (403), and a fresh browser without a login is
// sent to the hub's login page.
//
// Started by tests/hub/test_hub_admin.py with one JSON argument:
//   {hub, adminUrl, admin, student, password, group, shot, executablePath}
// Prints one JSON object (what it saw; "ok": false and "error" on failure).
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const cfg = JSON.parse(process.argv[2]);
const report = { ok: false, steps: [] };
const timeout = 30000;

const isLoopback = (url) => {
  try {
    const u = new URL(url);
    if (!/^(https?|wss?):$/.test(u.protocol)) return true;
    return ['127.0.0.1', 'localhost'].includes(u.hostname);
  } catch { return true; }
};

async function browser() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sandbox-admin-'));
  const context = await chromium.launchPersistentContext(dir, {
    executablePath: cfg.executablePath ?? '/usr/bin/chromium', headless: true, timeout,
    viewport: { width: 1280, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync', '--no-proxy-server',
           '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost'],
  });
  report.offLoopback = report.offLoopback ?? [];
  context.on('request', (req) => { if (!isLoopback(req.url())) report.offLoopback.push(req.url()); });
  return { context, dir };
}

async function login(page, user) {
  // with ?next= the hub sends the browser there after login instead of spawning a server
  await page.goto(`${cfg.hub}/hub/login?next=${encodeURIComponent('/hub/home')}`, { timeout });
  await page.fill('input[name=username]', user);
  await page.fill('input[name=password]', cfg.password);
  await Promise.all([page.waitForLoadState('load'), page.click('input[type=submit], button[type=submit]')]);
}

// the admin page's own origin (not the hub's, which users' servers share)
const adminUrl = cfg.adminUrl;

// The hub asks once whether the service may know who you are (its OAuth consent page).
async function open(page, url) {
  const response = await page.goto(url, { timeout });
  if (page.url().includes('/hub/api/oauth2/authorize')) {
    report.steps.push('authorized the service at the hub');
    const [final] = await Promise.all([
      page.waitForNavigation({ timeout }),
      page.click('button:has-text("Authorize")'),
    ]);
    return final;
  }
  return response;
}
let opened = [];
try {
  // the teacher
  let b = await browser(); opened.push(b);
  let page = b.context.pages()[0] ?? await b.context.newPage();
  await login(page, cfg.admin);
  report.steps.push('admin logged in');
  const response = await open(page, adminUrl);
  report.adminStatus = response.status();
  report.adminUrl = page.url();
  await page.waitForSelector('#sandboxes', { timeout });
  report.sandboxesText = await page.textContent('#sandboxes');
  report.sandboxRows = await page.$$eval('#sandboxes tr', (rows) =>
    rows.map((row) => [...row.cells].map((cell) => cell.textContent.trim())));
  report.auditText = await page.textContent('#audit');
  report.steps.push('admin page shown');
  await page.selectOption('#set-ceiling select[name=kind]', 'groups');
  await page.fill('#set-ceiling input[name=name]', cfg.group);
  await Promise.all([page.waitForNavigation({ timeout }), page.click('#set-ceiling button[value=exam]')]);
  report.message = await page.textContent('#message');
  report.overridesText = await page.textContent('#overrides');
  report.sandboxRowsAfter = await page.$$eval('#sandboxes tr', (rows) =>
    rows.map((row) => [...row.cells].map((cell) => cell.textContent.trim())));
  report.steps.push('exam mode set');
  if (cfg.shot) await page.screenshot({ path: cfg.shot, fullPage: true });

  // a student
  b = await browser(); opened.push(b);
  page = b.context.pages()[0] ?? await b.context.newPage();
  await login(page, cfg.student);
  const denied = await open(page, adminUrl);
  report.studentStatus = denied.status();
  report.studentText = (await page.textContent('body')).slice(0, 300);
  report.steps.push('student refused');

  // nobody
  b = await browser(); opened.push(b);
  page = b.context.pages()[0] ?? await b.context.newPage();
  await page.goto(adminUrl, { timeout });
  report.anonymousUrl = page.url();
  report.steps.push('anonymous sent to login');
  report.ok = true;
} catch (err) {
  report.error = String(err && err.stack || err);
} finally {
  for (const b of opened) {
    await b.context.close().catch(() => {});
    fs.rmSync(b.dir, { recursive: true, force: true });
  }
}
console.log(JSON.stringify(report));
process.exit(report.ok ? 0 : 1);
