// The Playground: the options object of the product page, resolved live by the SDK, on two
// "devices" (two storage namespaces of this browser). Everything it calls is this server.
import WidgetIdentity from "/widget/v1/identity.js";

const ADA = { userId: "ada", name: "Ada Lovelace", email: "ada@example.com" };
const PHONE = { key: "phone", label: "Phone", type: "text", required: false };
const $ = (id) => document.getElementById(id);

let widgetToken = null;

async function demo(path, body) {
  const response = await fetch(`/playground/api/${path}`, {
    method: body === undefined ? "GET" : "POST",
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const payload = await response.json();
  if (!response.ok) throw Object.assign(new Error(payload.detail), { code: payload.code, status: response.status });
  return payload;
}

function pageSettings() {
  return {
    collectUserData: $("collectUserData").checked,
    prefillUserData: { name: $("prefillName").checked, email: $("prefillEmail").checked },
    extraDataCollectionFields: $("extraPhone").checked ? [PHONE] : [],
  };
}

function customData() {
  const plan = $("plan").value.trim();
  return plan ? { plan } : undefined;
}

// --- the snippet, written the way the product page writes it ------------------------------

function literal(value, indent = "") {
  if (typeof value === "function") return value.snippet;
  if (Array.isArray(value)) return `[ ${value.map((v) => literal(v, indent)).join(", ")} ]`;
  if (value && typeof value === "object") {
    const parts = Object.entries(value).map(([k, v]) => `${k}: ${literal(v, indent)}`);
    return `{ ${parts.join(", ")} }`;
  }
  return JSON.stringify(value);
}

function snippetOptions(verified) {
  const settings = pageSettings();
  const options = { token: widgetToken || "wit_..." };
  if (settings.collectUserData) options.collectUserData = true;
  if (settings.prefillUserData.name || settings.prefillUserData.email) {
    options.prefillUserData = settings.prefillUserData;
  }
  if (settings.extraDataCollectionFields.length) {
    options.extraDataCollectionFields = settings.extraDataCollectionFields;
  }
  if (verified) {
    const token = () => {};
    token.snippet = '() => fetch("/your-backend/widget-contact-token").then(r => r.text())';
    const user = { token };
    if ($("externalId").value.trim()) user.externalId = $("externalId").value.trim();
    Object.assign(user, { name: ADA.name, email: ADA.email });
    options.user = user;
  }
  if (customData()) options.customData = customData();
  return options;
}

function renderSnippet() {
  const options = snippetOptions(devices[0] && devices[0].verify.checked);
  const lines = Object.entries(options).map(([k, v]) => `${k}: ${literal(v)}`);
  $("snippet").textContent = `{ ${lines.join(",\n  ")} }`;
}

// --- a device: one SDK client with its own storage namespace -------------------------------

class Device {
  constructor(root) {
    this.root = root;
    this.client = WidgetIdentity.create();
    this.typed = null; // what the visitor typed into the widget's form
    root.innerHTML = `
      <h2></h2>
      <label><input type="checkbox" class="verify"> Signed in as Ada (contact token from the demo backend)</label>
      <form class="collect" hidden></form>
      <dl>
        <dt>level</dt><dd><span class="level">-</span></dd>
        <dt>visitor</dt><dd class="visitor">-</dd>
        <dt>history scope</dt><dd class="scope">-</dd>
        <dt>merge</dt><dd class="merge">none</dd>
      </dl>
      <table><thead><tr><th>attribute</th><th>value</th><th>source</th><th>verified</th></tr></thead>
        <tbody class="attributes"></tbody></table>
      <div class="actions"><button type="button" class="say">Say hello</button>
        <button type="button" class="logout">Log out</button></div>
      <div class="error" role="alert"></div>
      <h3>History</h3><ol class="history"></ol>`;
    root.querySelector("h2").textContent = root.dataset.title;
    this.verify = root.querySelector(".verify");
    this.verify.addEventListener("change", () => {
      renderSnippet();
      this.start();
    });
    root.querySelector(".say").addEventListener("click", () => this.say());
    root.querySelector(".logout").addEventListener("click", () => this.logout());
    root.querySelector("form").addEventListener("submit", (event) => {
      event.preventDefault();
      const data = new FormData(event.target);
      const fields = {};
      for (const [key, value] of data.entries()) if (!["name", "email"].includes(key)) fields[key] = value;
      this.typed = { name: data.get("name") || undefined, email: data.get("email") || undefined, fields };
      this.start();
    });
    this.client.addEventListener("identitychange", () => this.render());
    this.client.addEventListener("error", (event) => this.fail(event.detail));
  }

  options() {
    const options = {
      token: widgetToken,
      ...pageSettings(),
      storageKey: this.root.dataset.device,
      customData: customData(),
    };
    const externalId = $("externalId").value.trim() || undefined;
    if (this.verify.checked) {
      const token = async () => (await demo("contact-token", { ...ADA, externalId })).token;
      options.user = { token, externalId, name: ADA.name, email: ADA.email };
    } else if (this.typed) {
      options.user = { name: this.typed.name, email: this.typed.email };
      options.fields = this.typed.fields;
    }
    return options;
  }

  async start() {
    this.fail(null);
    try {
      await this.client.start(this.options());
    } catch (error) {
      this.fail(error);
    }
  }

  fail(error) {
    this.root.querySelector(".error").textContent = error
      ? `${error.code} (${error.status}): ${error.detail || error.message}`
      : "";
  }

  async say() {
    const session = this.client.session();
    if (!session) return;
    try {
      await demo("conversations", { sessionId: session.sessionId, message: { text: `Hello from ${this.root.dataset.title}` } });
      await this.render();
    } catch (error) {
      this.fail(error);
    }
  }

  async logout() {
    this.verify.checked = false;
    this.typed = null;
    try {
      await this.client.logout();
    } catch (error) {
      this.fail(error);
    }
  }

  renderForm(session) {
    const form = this.root.querySelector("form");
    const ask = session.identity.level === "verified" ? [] : session.collect.ask;
    form.hidden = ask.length === 0;
    form.replaceChildren();
    for (const field of ask) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.name = field.name;
      input.type = field.type === "boolean" ? "checkbox" : field.type === "number" ? "number" : field.type;
      input.value = session.collect.prefill[field.name] || "";
      label.append(`${field.label}${field.required ? " *" : ""} `, input);
      form.append(label);
    }
    if (ask.length) {
      const send = document.createElement("button");
      send.textContent = "Start chat";
      form.append(send);
    }
  }

  async render() {
    const session = this.client.session();
    if (!session) return;
    const { identity, merge } = session;
    const q = (selector) => this.root.querySelector(selector);
    q(".level").textContent = identity.level;
    q(".level").className = `level ${identity.level}`;
    q(".visitor").textContent = identity.visitorId;
    q(".scope").textContent =
      identity.level === "verified"
        ? `contact ${identity.contactId}, externalId ${identity.externalId ?? "(none)"}: every device`
        : "this browser only";
    const rows = Object.entries(identity.attributes).map(([name, a]) => {
      const row = document.createElement("tr");
      for (const text of [name, JSON.stringify(a.value), a.source, String(a.verified)]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      return row;
    });
    q(".attributes").replaceChildren(...rows);
    this.renderForm(session);
    q(".merge").textContent = merge ? `${merge.id}: ${merge.status}` : "none";
    if (merge) this.followMerge(merge.id);
    await this.renderHistory();
  }

  async followMerge(id) {
    // A login merge is recorded by the merge consumer shortly after the session resolves.
    for (let attempt = 0; attempt < 150; attempt += 1) {
      try {
        const found = await demo(`merges/${id}`);
        if (found.status !== "pending") {
          const moved = found.conversationsMoved;
          this.root.querySelector(".merge").textContent = `${id}: ${found.status}, ${moved} conversation(s) moved`;
          await this.renderHistory();
          return;
        }
      } catch (_) {}
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }

  async renderHistory() {
    try {
      const page = await this.client.history();
      const items = page.conversations.flatMap((c) =>
        c.messages.map((m) => {
          const item = document.createElement("li");
          item.textContent = `${m.text}${m.senderVerified ? " (verified sender)" : ""}`;
          return item;
        }),
      );
      this.root.querySelector(".history").replaceChildren(...items);
    } catch (error) {
      this.fail(error);
    }
  }
}

const devices = [...document.querySelectorAll(".device")].map((root) => new Device(root));

let restarts = 0;

async function restartAll() {
  // Toggles clicked in quick succession: only the newest settings' token may be used.
  const restart = ++restarts;
  let token;
  try {
    token = (await demo("widget-token", pageSettings())).widgetToken;
  } catch (error) {
    devices.forEach((d) => d.fail(error));
    return;
  }
  if (restart !== restarts) return;
  widgetToken = token;
  renderSnippet();
  await Promise.all(devices.map((d) => d.start()));
  if (restart === restarts) document.body.dataset.ready = "true";
}

for (const id of ["collectUserData", "prefillName", "prefillEmail", "extraPhone"]) {
  $(id).addEventListener("change", () => {
    document.body.dataset.ready = "false";
    restartAll();
  });
}
for (const id of ["externalId", "plan"]) {
  $(id).addEventListener("change", () => {
    renderSnippet();
    document.body.dataset.ready = "false";
    Promise.all(devices.map((d) => d.start())).then(() => (document.body.dataset.ready = "true"));
  });
}
$("copy").addEventListener("click", async () => {
  renderSnippet();
  const text = $("snippet").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("copied").textContent = "copied";
  } catch (_) {
    $("copied").textContent = "select the snippet below and copy it";
  }
});

restartAll();
