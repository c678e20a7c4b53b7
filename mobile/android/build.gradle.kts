// Android library module wrapping the generated Kotlin bindings and the per-ABI libraries
// (mobile/scripts/build-aar.sh fills src/main/kotlin and src/main/jniLibs first).
plugins {
    id("com.android.library") version "8.5.2"
    id("org.jetbrains.kotlin.android") version "2.0.21"
}

android {
    namespace = "dev.edgepack.mobile"
    compileSdk = 34
    defaultConfig { minSdk = 24 }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    sourceSets["main"].kotlin.srcDir("src/main/kotlin")
}

kotlin { jvmToolchain(17) }

dependencies {
    api("net.java.dev.jna:jna:5.13.0@aar")
    api("org.jetbrains.kotlinx:kotlinx-coroutines-core:1.8.1")
}
