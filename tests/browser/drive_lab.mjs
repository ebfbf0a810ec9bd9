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
import path from 'node:path';
import { collapseLeftSidebar, finish, launchLoopback, newReport, openNotebook, recordFailure, shot as screenshot } from './lab.mjs';

const cfg = JSON.parse(process.argv[2]);
const timeout = cfg.timeoutMs ?? 45000;
// loading JupyterLab and starting the kernel take longest on a busy machine
const slow = Math.max(timeout, 90000);
const allowCommand = `%sandbox allow ${cfg.host}:${cfg.port}/tcp`;
const report = newReport({ timings: {} });
const started = Date.now();
const step = (name) => { report.steps.push(name); report.timings[name] = Date.now() - started; };

let context;
try {
  let page;
  ({ context, page } = await launchLoopback(cfg, report, { width: 1280, height: 900 }));
  const shot = (name) => screenshot(page, report, name, path.join(cfg.shots, `${name}.png`));

  // -- open the notebook; the Sandbox kernel starts from its metadata --------------------
  const { cells, kernelName, idle, prompt, runCell } = await openNotebook(page, cfg, slow);
  step('notebook open');
  await cells.nth(1).waitFor();

  // If JupyterLab asks for a kernel (it should not: the notebook names it), choose Sandbox.
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
  await idle.waitFor({ timeout: slow });
  step('kernel idle');
  await collapseLeftSidebar(page);

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
  await recordFailure(report, context, cfg, err);
} finally {
  await finish(report, context, started);
}
