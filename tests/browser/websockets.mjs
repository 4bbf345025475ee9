// Headless Chromium opens WebSockets to the broker and reports, as one JSON
// line, what each saw: the extensions the handshake agreed
// (`ws.extensions`) and whether text and binary messages came back byte for
// byte. tests/browser.rs runs it:  node websockets.mjs BASE_URL PATH...
import { chromium } from "playwright-core";

const [base, ...paths] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  // This machine's network is closed: without these, Chromium's own
  // background connections are refused many at a time.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  const page = await browser.newPage();
  const results = {};
  for (const path of paths) {
    results[path] = await page.evaluate(async (url) => {
      const ws = new WebSocket(url);
      ws.binaryType = "arraybuffer";
      const queue = [];
      const waiting = [];
      ws.onmessage = (e) => (waiting.length ? waiting.shift()(e.data) : queue.push(e.data));
      const next = () =>
        new Promise((resolve) => (queue.length ? resolve(queue.shift()) : waiting.push(resolve)));
      await new Promise((resolve, reject) => {
        ws.onopen = resolve;
        ws.onerror = () => reject(new Error(`could not open ${url}`));
      });
      // A chat room announces joins; an echo only echoes. The JSON of a
      // chat message, long enough to be compressed.
      const text = JSON.stringify({ room: 7, text: "hello from chromium ".repeat(40) });
      const binary = new Uint8Array(4096).map((_, i) => (i * 7) % 256);
      const sameBytes = (a, b) =>
        a instanceof ArrayBuffer && a.byteLength === b.length && new Uint8Array(a).every((x, i) => x === b[i]);
      const untilNot = async (skip) => {
        for (;;) {
          const m = await next();
          if (!(typeof m === "string" && m.startsWith(skip))) return m;
        }
      };
      ws.send(text);
      const textBack = (await untilNot("join:")) === text;
      ws.send(binary);
      const binaryBack = sameBytes(await untilNot("join:"), binary);
      const extensions = ws.extensions;
      ws.close(1000, "done");
      const closed = await new Promise((resolve) => (ws.onclose = (e) => resolve(e.code)));
      return { extensions, textBack, binaryBack, closed };
    }, base + path);
  }
  console.log(JSON.stringify(results));
} finally {
  await browser.close();
}
