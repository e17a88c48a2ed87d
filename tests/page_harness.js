// Runs the web page's script (img2vid/page.html) in Node against a live server, with a minimal stand-in for the
// DOM: the form's fields, its submit and Stop buttons, the status lines and the result area. The page's fetch calls
// go to the real server. Used by tests/test_server.py; prints one JSON object with what the page shows at the end.
// usage: node page_harness.js BASE_URL PAGE_HTML IMAGE_FILE FIELDS_JSON stop|wait
"use strict";
const fs = require("fs");
const [base, pagePath, imagePath, fieldsJson, mode] = process.argv.slice(2);

function element(tag) {
  const listeners = {};
  return {
    tag, value: "", textContent: "", disabled: false, hidden: false, children: [],
    addEventListener(type, fn) { listeners[type] = fn; },
    fire(type, ev) { return listeners[type](ev); },
    append(...kids) { this.children.push(...kids); },
  };
}
const elements = {};
globalThis.document = {
  getElementById: (id) => (elements[id] ??= element("#" + id)),
  createElement: (tag) => element(tag),
};
const realFetch = fetch;
globalThis.fetch = (url, options) => realFetch(base + url, options);

const html = fs.readFileSync(pagePath, "utf8");
// Every <input>/<select> starts at the value the page gives it, as a browser would
for (const [tag, id] of html.matchAll(/<(?:input|select) id="(\w+)"[^>]*>/g)) {
  document.getElementById(id).value = (tag.match(/ value="([^"]*)"/) || [])[1] ?? "";
}
for (const [k, v] of Object.entries(JSON.parse(fieldsJson))) document.getElementById(k).value = String(v);
document.getElementById("image").files = [new Blob([fs.readFileSync(imagePath)])];
new Function(html.match(/<script>([\s\S]*)<\/script>/)[1])();

async function main() {
  const $ = document.getElementById;
  const submitted = $("f").fire("submit", { preventDefault() {} });
  const seen = { stopShown: $("stop").hidden === false, statuses: [] };
  if (mode === "stop") {  // wait until the page shows our generation under way, then press Stop
    for (let i = 0; i < 600 && !$("status").textContent.startsWith("denoise"); i++) {
      await new Promise((r) => setTimeout(r, 50));
    }
    seen.statuses.push($("status").textContent);
    $("stop").fire("click");
  }
  await submitted;
  console.log(JSON.stringify({
    ...seen, status: $("status").textContent, error: $("error").textContent, goDisabled: $("go").disabled,
    stopHidden: $("stop").hidden, result: $("result").children.map((c) => c.tag),
  }));
}
main().catch((e) => { console.error(String(e)); process.exit(1); });
