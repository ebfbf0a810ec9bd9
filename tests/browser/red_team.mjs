// A cell's output attacks the browser (issue 19, point 1): run the red-team cell and an
// ordinary-output cell in JupyterLab in headless Chromium, and record whether any payload ran.
//
// Started by tests/browser/test_untrusted_output.py with one argument, a JSON object:
//   {url, token, notebook, recorder, shots, shotName, failureDir, userDataDir, executablePath, timeoutMs}
// The notebook's first cell is the red-team cell, the second the ordinary output, the third a
// barrier (`print('barrier')`). Each payload first pushes its name onto window.__pwned (at once,
// in the page) and then asks the loopback recorder for /hit/<name>; the script payload also sends
// an execute_request over its own kernel websocket and POSTs /api/terminals, as the attack did.
// Prints one JSON object on stdout: what ran (window.__pwned), every execute_request the page
// sent on any websocket, every POST to /api/terminals, and what the ordinary cell rendered.
import path from 'node:path';
import { collapseLeftSidebar, finish, hideToken, launchLoopback, newReport, openNotebook, recordFailure, shot } from './lab.mjs';

const cfg = JSON.parse(process.argv[2]);
const timeout = cfg.timeoutMs ?? 45000;
const slow = Math.max(timeout, 90000);
const report = newReport({ pwned: [], executeRequests: [], terminalPosts: [], uiRuns: 0 });
const started = Date.now();
const step = (name) => report.steps.push(`${name} @${Date.now() - started}ms`);

// the Jupyter messages in one websocket frame: JSON text, or JupyterLab's binary v1 framing
// (offsets, then channel, header, parent, metadata, content): the header's msg_type says it all
const msgTypes = (payload) => {
  const text = typeof payload === 'string' ? payload : Buffer.from(payload).toString('latin1');
  return [...text.matchAll(/"msg_type"\s*:\s*"([a-z_]+)"/g)].map((m) => m[1]);
};

let context;
try {
  let page;
  ({ context, page } = await launchLoopback(cfg, report, { width: 1280, height: 1800 }));
  context.on('request', (req) => {
    if (req.method() === 'POST' && new URL(req.url()).pathname.endsWith('/api/terminals')) {
      report.terminalPosts.push(hideToken(req.url()));
    }
  });
  // every websocket the page opens (JupyterLab's own and any a payload opens) and every
  // execute_request sent on one: JupyterLab sends exactly one per cell this script runs
  page.on('websocket', (ws) => {
    ws.on('framesent', (frame) => {
      for (const type of msgTypes(frame.payload)) {
        if (type === 'execute_request') report.executeRequests.push(hideToken(ws.url()));
      }
    });
  });

  const { cells, kernelName, idle, prompt, runCell } = await openNotebook(page, cfg, slow);
  await cells.nth(2).waitFor();
  await kernelName.filter({ hasText: 'Sandbox' }).waitFor({ timeout: slow });
  await idle.waitFor({ timeout: slow });
  step('kernel idle');
  await collapseLeftSidebar(page);

  const run = async (i) => {
    await runCell(i);
    report.uiRuns += 1;
    await prompt(i).filter({ hasText: /\[\d+\]/ }).waitFor({ timeout: slow });
    await idle.waitFor({ timeout: slow });
  };

  // -- the red-team cell ---------------------------------------------------------------
  await run(0);
  const attack = cells.nth(0).locator('.jp-Cell-outputArea');
  await attack.locator('.jp-OutputArea-output').filter({ hasText: 'just a chart' }).waitFor();
  await attack.locator('.jp-OutputArea-output').filter({ hasText: 'last output' }).waitFor();
  // every image in the outputs has finished loading or failing: an onerror would have run
  await page.waitForFunction(() => [...document.querySelectorAll('.jp-Cell-outputArea img')].every((i) => i.complete));
  // the javascript: link (its href, if the kernel let one through) is clicked as a user would
  const link = attack.locator('a').filter({ hasText: 'open the chart' });
  report.linkHref = await link.first().getAttribute('href');
  await link.first().click();
  step('red-team cell rendered, link clicked');
  report.attackText = (await attack.innerText()).trim();
  // the rendered outputs other than the stderr notes (which name what was removed)
  report.attackHtml = (await attack.locator('.jp-OutputArea-output:not([data-mime-type*="stderr"])')
    .evaluateAll((els) => els.map((el) => el.innerHTML).join('\n'))).slice(0, 20000);
  // in the whole page: script elements in outputs, event-handler attributes, javascript: URLs
  report.liveDanger = await page.evaluate(() => {
    const found = [];
    for (const el of document.querySelectorAll('.jp-Cell-outputArea *')) {
      if (el.tagName.toLowerCase() === 'script') found.push('script element');
      for (const attr of el.attributes) {
        if (/^on/i.test(attr.name)) found.push(`${el.tagName} ${attr.name}`);
        if (/^\s*javascript:/i.test(attr.value)) found.push(`${el.tagName} ${attr.name}=javascript:`);
      }
    }
    return found;
  });

  // -- ordinary output: HTML formatting, Markdown, matplotlib PNG and SVG, a pandas table --
  await run(1);
  const plain = cells.nth(1).locator('.jp-Cell-outputArea');
  await plain.locator('table.dataframe').waitFor();
  const png = plain.locator('img[src^="data:image/png;base64,"]');
  await png.first().waitFor();
  await page.waitForFunction(() => [...document.querySelectorAll('.jp-Cell-outputArea img')].every((i) => i.complete));
  report.pngWidth = await png.first().evaluate((img) => img.naturalWidth);
  report.svgWidth = await plain.locator('img[src^="data:image/svg+xml"]').first().evaluate((img) => img.naturalWidth);
  report.markdownBold = await plain.locator('strong').filter({ hasText: 'markdown bold' }).count();
  report.markdownLink = await plain.locator('a').filter({ hasText: 'a link' }).first().getAttribute('href');
  report.tableCells = await plain.locator('table.dataframe td').allInnerTexts();
  report.bold = await plain.locator('b').filter({ hasText: 'bold text' }).count();
  report.greenColor = await plain.locator('span').filter({ hasText: 'green text' }).first()
    .evaluate((el) => getComputedStyle(el).color);
  report.codeText = await plain.locator('code').filter({ hasText: 'code' }).count();
  await cells.nth(0).scrollIntoViewIfNeeded();
  await shot(page, report, 'outputs', path.join(cfg.shots, `${cfg.shotName ?? 'untrusted-output'}.png`));
  step('ordinary output rendered');

  // -- a barrier cell: what a payload started has had the time of a whole cell to show up --
  await run(2);
  await cells.nth(2).locator('.jp-OutputArea-output').filter({ hasText: 'barrier' }).waitFor();
  report.lastPrompt = (await prompt(2).innerText()).trim();
  report.pwned = await page.evaluate(() => window.__pwned ?? []);
  step('barrier');
  report.ok = true;
} catch (err) {
  await recordFailure(report, context, cfg, err, async (page) => {
    report.pwned = await page.evaluate(() => window.__pwned ?? []);
  });
} finally {
  await finish(report, context, started);
}
