// A teacher's browser (headless Chromium) that uses the admin page and then opens a student's
// page: the teacher logs in to the hub, opens the admin page where the hub serves it to
// everyone (/services/<name>/admin on the hub's origin) and on its own origin, then opens
// attack pages served under /user/<student>/ (on the hub's origin, and on the admin page's
// host behind the hub's port). Each attack page reports what its script could do.
//
// Started by tests/hub/test_hub_admin_origin.py with one JSON argument:
//   {hub, sharedAdminUrl, adminUrl, prefix, attackUrls, admin, password, victim, executablePath}
// Prints one JSON object ("ok": false and "error" on failure).
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const cfg = JSON.parse(process.argv[2]);
const report = { ok: false, steps: [], attacks: [], popups: [] };
const timeout = 60000;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sandbox-origin-'));
let context;

async function open(page, url) {
  // the hub asks once whether the service may know who you are (its OAuth consent page)
  const response = await page.goto(url, { timeout });
  if (page.url().includes('/hub/api/oauth2/authorize')) {
    report.steps.push(`authorized the service at the hub for ${url}`);
    const [final] = await Promise.all([page.waitForNavigation({ timeout }), page.click('button:has-text("Authorize")')]);
    return final;
  }
  return response;
}

try {
  context = await chromium.launchPersistentContext(dir, {
    executablePath: cfg.executablePath ?? '/usr/bin/chromium', headless: true, timeout,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync', '--no-proxy-server', '--disable-popup-blocking',
           '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost'],
  });
  // what the windows the attack pages opened got back
  context.on('page', (p) => {
    p.on('response', (r) => {
      if (r.request().isNavigationRequest()) report.popups.push({ url: r.url(), status: r.status(), method: r.request().method() });
    });
  });
  const page = context.pages()[0] ?? await context.newPage();
  await page.goto(`${cfg.hub}/hub/login?next=${encodeURIComponent('/hub/home')}`, { timeout });
  await page.fill('input[name=username]', cfg.admin);
  await page.fill('input[name=password]', cfg.password);
  await Promise.all([page.waitForLoadState('load'), page.click('input[type=submit], button[type=submit]')]);
  report.steps.push('teacher logged in to the hub');

  // the admin page where the hub serves the service to everyone
  const shared = await open(page, cfg.sharedAdminUrl);
  report.shared = { status: shared.status(), url: page.url(), text: (await page.content()).slice(0, 3000),
                    hasSandboxes: (await page.$('#sandboxes')) !== null };
  // the admin page on its own origin
  const own = await open(page, cfg.adminUrl);
  report.admin = { status: own.status(), url: page.url(), hasSandboxes: (await page.$('#sandboxes')) !== null };
  const tokenInput = await page.$('#set-ceiling input[name=_xsrf]');
  const leaked = tokenInput ? await tokenInput.getAttribute('value') : '';
  report.steps.push('admin page used');

  // the student's pages, opened by the teacher; the page's token handed to them (a leak, the worst case)
  for (const url of cfg.attackUrls) {
    const attack = await context.newPage();
    const settings = { adminUrl: cfg.adminUrl, prefix: cfg.prefix, victim: cfg.victim, leaked };
    await attack.goto(`${url}#${encodeURIComponent(JSON.stringify(settings))}`, { timeout });
    await attack.waitForFunction(() => document.title === 'done', null, { timeout });
    const found = JSON.parse(await attack.textContent('#result'));
    const [posted] = await Promise.all([attack.waitForNavigation({ timeout }),
                                        attack.evaluate(() => window.submitAttack())]);
    found.adminFormPost = { status: posted.status(), url: posted.url(), method: posted.request().method() };
    found.adminFormPostText = (await attack.textContent('body')).slice(0, 500);
    report.attacks.push(found);
    report.steps.push(`attack page ${url} done`);
  }
  // let the windows the attack pages opened finish loading
  for (const p of context.pages()) await p.waitForLoadState('load', { timeout }).catch(() => {});

  // the real page still works for the teacher
  const again = await open(page, cfg.adminUrl);
  report.adminAgain = { status: again.status(), hasSandboxes: (await page.$('#sandboxes')) !== null };
  report.ok = true;
} catch (err) {
  report.error = String(err && err.stack || err);
} finally {
  if (context) await context.close().catch(() => {});
  fs.rmSync(dir, { recursive: true, force: true });
}
console.log(JSON.stringify(report));
process.exit(report.ok ? 0 : 1);
