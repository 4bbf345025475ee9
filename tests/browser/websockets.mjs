// Headless Chromium opens WebSockets to the broker and reports, as one JSON
// line, what each saw: the extensions the handshake agreed
// (`ws.extensions`) and whether text and binary messages came back byte for
// byte. tests/browser.rs runs it:  node websockets.mjs BASE_URL PATH...
// With WARM_UP set to a URL, each WebSocket is preceded by a no-cors fetch
// of it: over HTTPS that opens the page's HTTP/2 connection to the origin,
// which Chromium then reuses for a wss:// WebSocket (RFC 8441) if the
// server allows extended CONNECT.
import { chromium } from "playwright-core";

const [base, ...paths] = process.argv.slice(2);
const warmUp = process.env.WARM_UP ?? null;
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
  // A page on the broker's origin (its 404): a WebSocket from an opaque
  // origin such as about:blank shares no connection with anything.
  if (warmUp) await page.goto(warmUp);
  const results = {};
  for (const path of paths) {
    results[path] = await page.evaluate(async ([url, warmUp]) => {
      // Any answer will do (a 404 for an unknown path): only the
      // connection matters. Credentials as a WebSocket's, so that both
      // share one connection pool.
      if (warmUp) await fetch(warmUp, { mode: "no-cors", credentials: "include" });
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
    }, [base + path, warmUp]);
  }
  console.log(JSON.stringify(results));
} finally {
  await browser.close();
}
