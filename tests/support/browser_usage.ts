// A page's use of the SDK, type-checked against identity.d.ts by tests/test_browser.py: the
// options object exactly as the product page writes it must compile.
import WidgetIdentity, { WidgetIdentityError, createWidgetIdentity, type Session } from "./identity";

const options = {
  token: "wit_...",
  collectUserData: true,
  prefillUserData: { name: true, email: true },
  extraDataCollectionFields: [{ key: "phone", label: "Phone", type: "text" as const, required: false }],
  user: {
    token: () => fetch("/api/widget-token").then((r) => r.text()),
    externalId: "workspace-1",
    name: "Ada",
    email: "ada@example.com",
  },
  customData: { plan: "pro" },
};

async function main(): Promise<void> {
  WidgetIdentity.addEventListener("identitychange", (event) => {
    const level: "anonymous" | "unverified" | "verified" = event.detail.identity.level;
    console.log(level, event.detail.reason);
  });
  try {
    const session: Session = await WidgetIdentity.start(options);
    const name = session.identity.attributes["name"];
    console.log(name?.source, name?.verified, session.merge?.status);
    const page = await WidgetIdentity.history({ limit: 10 });
    console.log(page.conversations.length, page.nextCursor);
    const anonymous = await WidgetIdentity.logout();
    console.log(anonymous.visitorToken);
  } catch (error) {
    if (error instanceof WidgetIdentityError) console.log(error.code, error.status, error.detail);
  }
  const device = createWidgetIdentity();
  await device.start({ token: "wit_...", user: { token: "eyJ...", externalId: "w" }, storageKey: "b" });
  console.log(window.WidgetIdentity.identity()?.visitorId, device.session()?.sessionId);
}

void main();
